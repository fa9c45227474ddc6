"""StructuredOutputManager without a model: the bitmask rows of a step, the matcher advanced by
accepted tokens, the compile cache, and the tokenizer/logits vocabulary gap."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from pagedllm.engine.sampling_params import SamplingParams, StructuredOutputsParams
from pagedllm.engine.scheduler import EngineCoreOutput
from pagedllm.engine.scheduler_output import SchedulerOutput
from pagedllm.structured_output import StructuredOutputManager

EOS = 1


def _allowed(row: np.ndarray) -> set[int]:
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    return set(np.flatnonzero(bits).tolist())


def _step(*req_ids: str) -> SchedulerOutput:
    return SchedulerOutput([], [], {r: 1 for r in req_ids}, len(req_ids))


def _output(req_id: str, tokens: list[int], finished: bool = False) -> EngineCoreOutput:
    return EngineCoreOutput(req_id, tokens, "stop" if finished else None, None, None, None, 0)


@pytest.fixture(scope="module")
def tokenizer(tiny_bpe_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_bpe_tokenizer_dir)


def test_bitmask_rows_follow_the_grammar_and_end_with_eos_only(tokenizer):
    manager = StructuredOutputManager(tokenizer, vocab_size=600, stop_token_ids=[EOS])
    assert manager.num_words == (600 + 31) // 32  # padded to the logits' vocabulary
    spec = StructuredOutputsParams(choice=["hello"])
    manager.add_request("c", SamplingParams(structured_outputs=spec))
    manager.add_request("free", SamplingParams())
    step = _step("free", "c")
    manager.grammar_bitmask(step)
    assert step.structured_output_request_ids == {"c": 0} and step.grammar_bitmask.shape == (1, manager.num_words)
    allowed = _allowed(step.grammar_bitmask[0])
    assert allowed and max(allowed) < len(tokenizer)
    assert all("hello".startswith(tokenizer.decode([t])) for t in allowed)
    manager.accept_tokens([_output("c", tokenizer.encode("hello", add_special_tokens=False))])
    step = _step("c")
    manager.grammar_bitmask(step)
    assert _allowed(step.grammar_bitmask[0]) == {EOS}
    manager.accept_tokens([_output("c", [EOS], finished=True)])
    assert not manager.has_requests()


def test_equal_specs_compile_once_and_bad_specs_are_value_errors(tokenizer):
    manager = StructuredOutputManager(tokenizer, vocab_size=512, stop_token_ids=[EOS])
    compiler = manager._get_compiler()
    first = compiler.compile(StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}}))
    again = compiler.compile(StructuredOutputsParams(json='{"type": "object", "properties": {"a": {"type": "integer"}}}'))
    assert first is again
    with pytest.raises(ValueError, match="regex"):
        manager.validate(SamplingParams(structured_outputs=StructuredOutputsParams(regex="(unclosed")))


def test_no_tokenizer_is_a_value_error():
    manager = StructuredOutputManager(None, vocab_size=512, stop_token_ids=[EOS])
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        manager.validate(SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a"])))


def test_json_object_starts_an_object_only(tokenizer):
    """json_object is any JSON object (vLLM compiles {"type": "object"}), never an array or a
    scalar: the first step allows only tokens that open an object."""
    manager = StructuredOutputManager(tokenizer, vocab_size=600, stop_token_ids=[EOS])
    manager.add_request("o", SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True,
                                                                                       disable_any_whitespace=True)))
    step = _step("o")
    manager.grammar_bitmask(step)
    allowed = _allowed(step.grammar_bitmask[0])
    assert allowed and all(tokenizer.decode([t]).startswith("{") for t in allowed)

