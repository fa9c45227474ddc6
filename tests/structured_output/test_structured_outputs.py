"""Structured outputs on a random tiny model: the grammar alone drives the output, which must
parse against the spec every time; an invalid spec is a ValueError before any work."""

from __future__ import annotations

import json
import re

import pytest
from tiny_models import make_tiny_checkpoint

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import StructuredOutputsParams

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["age"],
        },
    },
    "required": ["name", "kind", "tags", "owner"],
}
REGEX = r"[a-c]{2,5}-[0-9]{3}"
GRAMMAR = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'
PROMPTS = ["hello world", "the paged attention model", "café naïve 中文 🙂"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory, tiny_bpe_tokenizer_dir) -> LLM:
    path = make_tiny_checkpoint(
        tmp_path_factory.mktemp("structured") / "model", "qwen3", vocab_size=520,
        tokenizer_dir=tiny_bpe_tokenizer_dir, seed=11,
    )
    return LLM(str(path), dtype="float32", kv_cache_memory_bytes=1 << 24)


def _check_person(value: dict) -> None:
    assert set(value) == {"name", "kind", "tags", "owner"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 6
    assert value["kind"] in ("cat", "dog", "fish")
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3
    assert all(isinstance(tag, bool) for tag in value["tags"])
    assert set(value["owner"]) == {"age"} and 0 <= value["owner"]["age"] <= 120


def _generate(llm: LLM, spec: StructuredOutputsParams, **params) -> list:
    sampling = [
        SamplingParams(temperature=0, max_tokens=300, structured_outputs=spec, **params),
        SamplingParams(temperature=1.0, seed=3, max_tokens=300, structured_outputs=spec, **params),
    ]
    outputs = llm.generate(PROMPTS[:2], sampling, use_tqdm=False)
    for output in outputs:
        assert output.outputs[0].finish_reason == "stop", output.outputs[0]
    return [output.outputs[0].text for output in outputs]


def test_json_schema_with_nested_objects_enums_and_arrays(llm):
    spec = StructuredOutputsParams(json=PERSON_SCHEMA, disable_any_whitespace=True)
    for text in _generate(llm, spec):
        # strict=False: xgrammar's JSON strings admit raw control characters (so do vLLM's).
        _check_person(json.loads(text, strict=False))


def test_json_properties_come_in_the_schema_order(llm):
    """xgrammar emits properties in the order the schema lists them, as vLLM does: a dict
    schema is not reordered on its way to the compiler."""
    schema = {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "integer"}},
              "required": ["zeta", "alpha"]}
    for spec in (StructuredOutputsParams(json=schema, disable_any_whitespace=True),
                 StructuredOutputsParams(json=json.dumps(schema), disable_any_whitespace=True)):
        for text in _generate(llm, spec):
            assert list(json.loads(text, strict=False)) == ["zeta", "alpha"]


def test_regex_choice_and_ebnf_grammar(llm):
    for text in _generate(llm, StructuredOutputsParams(regex=REGEX)):
        assert re.fullmatch(REGEX, text), text
    for text in _generate(llm, StructuredOutputsParams(choice=["yes", "no", "maybe so"])):
        assert text in ("yes", "no", "maybe so")
    for text in _generate(llm, StructuredOutputsParams(grammar=GRAMMAR)):
        assert re.fullmatch(r"\([0-9](\+[0-9])*\)", text), text


def test_constrained_and_free_requests_share_a_batch(llm):
    free = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = llm.generate(PROMPTS, free, use_tqdm=False)
    spec = StructuredOutputsParams(choice=["yes", "no"])
    mixed = llm.generate(
        PROMPTS, [free, SamplingParams(temperature=0, max_tokens=50, structured_outputs=spec), free], use_tqdm=False
    )
    assert [mixed[i].outputs[0].token_ids for i in (0, 2)] == [alone[i].outputs[0].token_ids for i in (0, 2)]
    assert mixed[1].outputs[0].text in ("yes", "no")


def test_guided_decoding_is_the_old_name_of_structured_outputs(llm):
    params = SamplingParams(temperature=0, max_tokens=20, guided_decoding=StructuredOutputsParams(choice=["ab", "c"]))
    assert params.structured_outputs is not None and params.guided_decoding is None
    assert llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].text in ("ab", "c")


@pytest.mark.parametrize(
    "spec",
    [
        {"json": {"type": "nonsense"}},
        {"json": "{not json"},
        {"regex": "([a-"},
        {"grammar": "root ::= missing_rule"},
    ],
)
def test_invalid_spec_is_a_value_error_before_any_work(llm, spec):
    before = llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="structured_outputs"):
        llm.generate(["fine", "also fine"], SamplingParams(structured_outputs=StructuredOutputsParams(**spec)), use_tqdm=False)
    assert llm.llm_engine.has_unfinished_requests() == before == False  # noqa: E712


def test_params_need_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
