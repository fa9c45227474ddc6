"""logit_bias, allowed_token_ids, bad_words, logits processors and the grammar bitmask, each
checked against a plain-torch edit of the same logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.layers.sampler import Sampler, SamplingMetadata
from pagedllm.layers.token_controls import apply_grammar_bitmask

CPU = torch.device("cpu")
VOCAB = 64


def build(params, outputs=None, prompts=None) -> SamplingMetadata:
    rows = len(params)
    return SamplingMetadata.build(
        params=params,
        prompt_token_ids=prompts or [[] for _ in range(rows)],
        output_token_ids=outputs or [[] for _ in range(rows)],
        generators=[None] * rows,
        default_generator=None,
        eos_token_id=None,
        vocab_size=VOCAB,
        device=CPU,
    )


def logits_after_controls(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """The logits the sampler draws from: captured through a greedy argmax check per token."""
    from pagedllm.layers.token_controls import apply_token_controls

    return apply_token_controls(apply_grammar_bitmask(logits.clone(), metadata.grammar_bitmask), metadata.token_controls)


def test_logit_bias_adds_to_the_named_tokens():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0, logit_bias={3: 5.0, "7": -2.5}), SamplingParams(temperature=0)]
    metadata = build(params)
    expected = logits.clone()
    expected[0, 3] += 5.0
    expected[0, 7] -= 2.5
    torch.testing.assert_close(logits_after_controls(logits, metadata), expected, rtol=0, atol=0)
    # +100 makes token 9 the greedy choice; the clamp keeps 1000 at 100.
    out = Sampler()(logits[:1], build([SamplingParams(temperature=0, logit_bias={9: 1000})]))
    assert out.sampled_token_ids.tolist() == [9]


def test_allowed_token_ids_mask_every_other_token():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))
    allowed = [4, 11, 30]
    metadata = build([SamplingParams(temperature=0, allowed_token_ids=allowed), SamplingParams(temperature=0)])
    expected = logits.clone()
    keep = torch.zeros(VOCAB, dtype=torch.bool)
    keep[allowed] = True
    expected[0, ~keep] = -math.inf
    torch.testing.assert_close(logits_after_controls(logits, metadata), expected, rtol=0, atol=0)
    sampled = Sampler()(logits, build([SamplingParams(temperature=1.0, seed=1, allowed_token_ids=allowed)] * 2))
    assert set(sampled.sampled_token_ids.tolist()) <= set(allowed)


def test_bad_words_ban_the_last_token_after_the_preceding_ones():
    logits = torch.zeros(3, VOCAB)
    params = SamplingParams(temperature=0, bad_words=["x"])
    params.bad_words_token_ids = [[5], [8, 9, 10]]
    metadata = build([params] * 3, outputs=[[1, 2], [8, 9], [9, 8]])
    result = logits_after_controls(logits, metadata)
    expected = torch.zeros(3, VOCAB)
    expected[:, 5] = -math.inf  # single-token words are always banned
    expected[1, 10] = -math.inf  # only row 1 just generated 8, 9
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


def test_logits_processors_get_their_row_and_history():
    seen = []

    def two_args(output_ids, row):
        seen.append(("two", list(output_ids)))
        row[0] = 50.0
        return row

    def three_args(prompt_ids, output_ids, row):
        seen.append(("three", list(prompt_ids), list(output_ids)))
        return row * 2

    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0, logits_processors=[two_args]), SamplingParams(temperature=0, logits_processors=[three_args])]
    metadata = build(params, outputs=[[3], [4, 5]], prompts=[[1], [2, 2]])
    expected = logits.clone()
    expected[0, 0] = 50.0
    expected[1] *= 2
    torch.testing.assert_close(logits_after_controls(logits, metadata), expected, rtol=0, atol=0)
    assert seen == [("two", [3]), ("three", [2, 2], [4, 5])]


def test_grammar_bitmask_allows_exactly_the_set_bits_and_pads_the_vocabulary():
    logits = torch.randn(2, 70, generator=torch.Generator().manual_seed(3))
    # A 64-token tokenizer (2 words) under 70 logits: ids 64..69 are never allowed.
    allowed = [0, 31, 32, 63]
    bits = np.zeros((2, 2), dtype=np.uint32)
    for token in allowed:
        bits[0, token // 32] |= np.uint32(1 << (token % 32))
    bits[1] = 0xFFFFFFFF
    bitmask = torch.from_numpy(bits.view(np.int32))
    result = apply_grammar_bitmask(logits, bitmask)
    expected = torch.full_like(logits, -math.inf)
    expected[0, allowed] = logits[0, allowed]
    expected[1, :64] = logits[1, :64]
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


def test_invalid_controls_are_value_errors():
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"a": 1})
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=[""])
    with pytest.raises(ValueError, match="logits_processors"):
        SamplingParams(logits_processors=[3])
