"""OutputProcessor's output kinds (vLLM's RequestOutputKind), its held-back stop-string text and
its logprob texts, driven by hand-made step outputs (no model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagedllm.engine.output_processor import OutputProcessor, child_sampling_params
from pagedllm.engine.outputs import RequestOutput
from pagedllm.engine.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.engine.scheduler import EngineCoreOutput
from pagedllm.engine.scheduler_output import TokenLogprobs


@pytest.fixture(scope="module")
def tokenizer(tiny_bpe_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_bpe_tokenizer_dir)


def _step(child_id: str, token_ids: list[int], finish_reason: str | None = None,
          logprobs: bool = False) -> EngineCoreOutput:
    rows = TokenLogprobs([[t] for t in token_ids], [[-0.5] for _ in token_ids], [1] * len(token_ids)) if logprobs else None
    return EngineCoreOutput(child_id, token_ids, finish_reason, None, rows, None, 0)


def _run(tokenizer: PreTrainedTokenizerBase, params: SamplingParams, steps: list[list[int]],
         logprobs: bool = False) -> list[RequestOutput]:
    """Feeds one token list per step to one request (n=1), the last step finishing it by length."""
    processor = OutputProcessor(tokenizer)
    [child_id] = processor.add_request("r", None, [1, 2], [child_sampling_params(params, 0)])
    outputs = []
    for index, token_ids in enumerate(steps):
        finish = "length" if index == len(steps) - 1 else None
        outputs += processor.process_outputs([_step(child_id, token_ids, finish, logprobs)]).outputs
    return outputs


def test_delta_outputs_add_up_to_the_cumulative_ones(tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer.encode(" the quick brown fox jumps over the lazy dog")
    steps = [token_ids[i : i + 2] for i in range(0, len(token_ids), 2)]
    cumulative = _run(tokenizer, SamplingParams(max_tokens=64, logprobs=0), steps, logprobs=True)
    delta = _run(tokenizer, SamplingParams(max_tokens=64, logprobs=0, output_kind=RequestOutputKind.DELTA), steps,
                 logprobs=True)
    assert len(delta) == len(cumulative) == len(steps)
    for step, output in zip(steps, delta):
        assert output.outputs[0].token_ids == step
        assert len(output.outputs[0].logprobs) == len(step)
    assert "".join(o.outputs[0].text for o in delta) == cumulative[-1].outputs[0].text
    assert cumulative[-1].outputs[0].text == tokenizer.decode(token_ids)
    assert delta[-1].finished and delta[-1].outputs[0].finish_reason == "length"
    assert delta[-1].outputs[0].cumulative_logprob == pytest.approx(-0.5 * len(token_ids))


def test_final_only_returns_one_whole_output(tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer.encode(" one two three four")
    steps = [[t] for t in token_ids]
    outputs = _run(tokenizer, SamplingParams(max_tokens=64, output_kind=RequestOutputKind.FINAL_ONLY), steps)
    assert len(outputs) == 1 and outputs[0].finished
    assert outputs[0].outputs[0].token_ids == token_ids
    assert outputs[0].outputs[0].text == tokenizer.decode(token_ids)


def test_running_text_holds_back_a_possible_stop_string(tokenizer: PreTrainedTokenizerBase) -> None:
    """As in vLLM, an unfinished output never shows text that a stop string could still
    claim: the last len(longest stop) - 1 characters wait, so a stream never sends them."""
    token_ids = tokenizer.encode(" alpha beta gamma delta")
    steps = [[t] for t in token_ids]
    params = SamplingParams(max_tokens=64, stop=["zzzz"], output_kind=RequestOutputKind.DELTA)
    outputs = _run(tokenizer, params, steps)
    full = tokenizer.decode(token_ids)
    assert "".join(output.outputs[0].text for output in outputs) == full
    processor = OutputProcessor(tokenizer)
    [child] = processor.add_request("p", None, [1], [child_sampling_params(SamplingParams(stop=["zzzz"]), 0)])
    [running] = processor.process_outputs([_step(child, token_ids)]).outputs
    assert running.outputs[0].text == full[: len(full) - 3]


def test_delta_with_n_returns_only_the_completions_that_moved(tokenizer: PreTrainedTokenizerBase) -> None:
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(n=2, max_tokens=8, output_kind=RequestOutputKind.DELTA)
    first, second = processor.add_request("r", None, [1], [child_sampling_params(params, i) for i in range(2)])
    [output] = processor.process_outputs([_step(second, [5])]).outputs
    assert [c.index for c in output.outputs] == [1] and output.outputs[0].token_ids == [5]
    [output] = processor.process_outputs([_step(first, [6]), _step(second, [7])]).outputs
    assert [(c.index, c.token_ids) for c in output.outputs] == [(0, [6]), (1, [7])]


def test_detokenize_false_leaves_decoded_tokens_none(tokenizer: PreTrainedTokenizerBase) -> None:
    [output] = _run(tokenizer, SamplingParams(max_tokens=8, logprobs=0, detokenize=False), [[5, 6]], logprobs=True)
    assert output.outputs[0].text == ""
    assert all(entry.decoded_token is None for row in output.outputs[0].logprobs for entry in row.values())
    [output] = _run(tokenizer, SamplingParams(max_tokens=8, logprobs=0), [[5, 6]], logprobs=True)
    assert all(entry.decoded_token is not None for row in output.outputs[0].logprobs for entry in row.values())


def test_request_output_add_merges_deltas_or_replaces(tokenizer: PreTrainedTokenizerBase) -> None:
    token_ids = tokenizer.encode(" red green blue")
    steps = [[t] for t in token_ids]
    delta = _run(tokenizer, SamplingParams(max_tokens=8, output_kind=RequestOutputKind.DELTA), steps)
    merged = delta[0]
    for later in delta[1:]:
        merged.add(later, aggregate=True)
    assert merged.finished and merged.outputs[0].token_ids == token_ids
    assert merged.outputs[0].text == tokenizer.decode(token_ids)
    cumulative = _run(tokenizer, SamplingParams(max_tokens=8), steps)
    replaced = cumulative[0]
    replaced.add(cumulative[-1], aggregate=False)
    assert replaced.finished and replaced.outputs[0].token_ids == token_ids
