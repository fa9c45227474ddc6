"""Bidirectional spans (Gemma 3's image tokens see each other during prefill): the torch SDPA
backend against attention written out by hand in float64, with the mask transformers builds,
(causal OR same span) AND the sliding window over the past; and the Triton backend handing such
steps to it. Tolerance 1e-5 (fp32 inputs)."""

from __future__ import annotations

import pytest
import torch

from pagedllm.forward_context import AttentionMetadata
from pagedllm.layers.attention.backends.torch_sdpa import TorchSDPAAttention, causal_mask, write_kv_cache

HEADS, KV_HEADS, HEAD, BLOCK, NUM_BLOCKS = 4, 2, 16, 4, 16
SCALE = HEAD**-0.5


def reference(q, k, v, spans: list[tuple[int, int]], window: int | None) -> torch.Tensor:
    q_len, kv_len = q.shape[0], k.shape[0]
    k = k.double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * SCALE
    visible = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for i in range(q_len):
        query = kv_len - q_len + i
        for key in range(kv_len):
            same_span = any(start <= query < end and start <= key < end for start, end in spans)
            visible[i, key] = (key <= query or same_span) and (window is None or key > query - window)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).float()


def step_metadata(query_lens, seq_lens, tables, spans) -> AttentionMetadata:
    starts, slots = [0], []
    for q_len, seq_len, table in zip(query_lens, seq_lens, tables):
        starts.append(starts[-1] + q_len)
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(seq_len - q_len, seq_len)]
    return AttentionMetadata(
        num_actual_tokens=starts[-1], num_reqs=len(query_lens), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=torch.tensor([t + [0] * (4 - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots), query_start_loc_cpu=starts, seq_lens_cpu=seq_lens,
        bidirectional_spans=spans,
    )


def run_case(backend, window: int | None) -> None:
    torch.manual_seed(0)
    # Request 0: 4 tokens of history, then a 9-token prefill chunk holding two images at
    # positions 5..8 and 9..11. Request 1: a fresh prefill without images.
    query_lens, seq_lens, history = [9, 5], [13, 5], [4, 0]
    spans = [[(5, 9), (9, 12)], []]
    tables = [[3, 7, 1, 12], [5, 0]]
    keys = [torch.randn(n, KV_HEADS, HEAD) for n in seq_lens]
    values = [torch.randn(n, KV_HEADS, HEAD) for n in seq_lens]
    kv_cache = torch.full((2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD), float("nan"))
    past = step_metadata([4], [4], tables[:1], None)
    write_kv_cache(kv_cache, keys[0][:4], values[0][:4], past.slot_mapping)
    queries = [torch.randn(q, HEADS, HEAD) for q in query_lens]
    out = backend.forward(
        torch.cat(queries), torch.cat([k[h:] for k, h in zip(keys, history)]),
        torch.cat([v[h:] for v, h in zip(values, history)]), kv_cache,
        step_metadata(query_lens, seq_lens, tables, spans), SCALE,
    )
    expected = torch.cat([reference(*args, window) for args in zip(queries, keys, values, spans)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 3])
def test_tokens_of_one_span_see_each_other_and_nothing_else_changes(window: int | None) -> None:
    run_case(TorchSDPAAttention(sliding_window=window), window)


def test_span_mask_lets_a_query_see_later_keys_of_its_span_only() -> None:
    mask = causal_mask(4, 6, None, torch.device("cpu"), [(3, 5)])
    # query positions 2..5; keys 0..5; span [3, 5)
    assert mask[1].tolist() == [True, True, True, True, True, False]  # position 3 sees 4
    assert mask[0].tolist() == [True, True, True, False, False, False]  # position 2: causal
    assert mask[3].tolist() == [True] * 6


def test_triton_backend_hands_span_steps_to_the_reference() -> None:
    pytest.importorskip("triton")
    from pagedllm.layers.attention.backends.triton_paged import TritonPagedAttention

    run_case(TritonPagedAttention(sliding_window=3), 3)
