"""`pagedllm serve` constrains outputs (response_format, vLLM's structured_outputs and guided_*
extras) and applies token controls (logit_bias, allowed_token_ids, bad_words) like `LLM`.

The tiny model's weights are random, so only the grammar can make its output valid JSON: each
output must parse and validate against its schema."""

from __future__ import annotations

import json
import re

import pytest
from conftest import ENGINE_OPTIONS, MODEL_NAME

from pagedllm import LLM, SamplingParams

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
for _package in ("fastapi", "uvicorn", "zmq", "xgrammar"):
    pytest.importorskip(_package)

# One server for the whole module (conftest's `server`).
pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "give me a person"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
FLAGS = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["red", "green"]}},
    "required": ["ok", "tag"],
    "additionalProperties": False,
}
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def vocab(serve_model_dir) -> dict:
    """"text": token id -> its text; "no_whitespace": a logit_bias banning whitespace-only
    tokens (JSON allows any whitespace between tokens, and the random model would fill
    max_tokens with it before closing the object)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(serve_model_dir)
    vocab = {i: tokenizer.decode([i]) for i in range(len(tokenizer))}
    return {"no_whitespace": {str(i): -100 for i, text in vocab.items() if not text.strip()}, "text": vocab}


@pytest.fixture(scope="module")
def llm(serve_model_dir):
    llm = LLM(str(serve_model_dir), **ENGINE_OPTIONS)
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("schema", [PERSON, FLAGS], ids=["person", "flags"])
def test_chat_response_format_json_schema_output_validates(client, vocab, schema):
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1.0, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        extra_body={"logit_bias": vocab["no_whitespace"]},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content, strict=False), schema)


def test_completions_response_format_and_json_object(client, vocab):
    response = client.completions.create(
        model=MODEL_NAME, prompt="a person:", max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
                    "logit_bias": vocab["no_whitespace"]},
    )
    jsonschema.validate(json.loads(response.choices[0].text, strict=False), PERSON)
    # Any JSON object may nest without end: a bias towards "}" lets the random model close it.
    closing = {str(i): 10 for i, text in vocab["text"].items() if "}" in text}
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
        response_format={"type": "json_object"}, extra_body={"logit_bias": {**vocab["no_whitespace"], **closing}},
    )
    assert response.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(response.choices[0].message.content, strict=False), dict)


def test_vllm_guided_extras_constrain_the_output(client, vocab):
    choice = client.completions.create(
        model=MODEL_NAME, prompt="pick", max_tokens=20, temperature=0, extra_body={"guided_choice": ["yes", "no"]},
    ).choices[0]
    assert choice.text in ("yes", "no") and choice.finish_reason == "stop"
    text = client.completions.create(
        model=MODEL_NAME, prompt="number", max_tokens=20, temperature=0, extra_body={"guided_regex": r"[0-9]{3}-[a-c]{2}"},
    ).choices[0].text
    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", text), text
    content = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"structured_outputs": {"json": FLAGS, "disable_any_whitespace": True}},
    ).choices[0].message.content
    jsonschema.validate(json.loads(content, strict=False), FLAGS)
    assert not re.search(r"\s\s|\n|\t", content), content
    content = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"guided_json": PERSON, "logit_bias": vocab["no_whitespace"]},
    ).choices[0].message.content
    jsonschema.validate(json.loads(content, strict=False), PERSON)


def test_invalid_schema_is_a_400_in_openai_shape_and_the_server_goes_on(client):
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=5, response_format=bad)
    error = raised.value.body
    assert error["type"] == "BadRequestError" and error["code"] == 400 and "invalid" in error["message"]
    with pytest.raises(openai.BadRequestError, match="json_schema.schema"):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=5,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(openai.BadRequestError, match="one output constraint"):
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=5,
                                  extra_body={"guided_regex": "a+", "guided_choice": ["a"]})
    with pytest.raises(openai.BadRequestError, match="allowed_token_ids"):
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=5, extra_body={"allowed_token_ids": []})
    assert client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2).choices[0].finish_reason == "length"


def test_token_controls_equal_llm(client, llm):
    # OpenAI's logit_bias has string keys; the engine's, integer ids.
    body = {"logit_bias": {"17": 100, "23": -100}, "bad_words": ["hello"]}
    expected = llm.generate(
        "the paged attention model",
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={17: 100, 23: -100}, bad_words=["hello"]),
        use_tqdm=False,
    )[0].outputs[0]
    choice = client.completions.create(
        model=MODEL_NAME, prompt="the paged attention model", max_tokens=6, temperature=0,
        extra_body={**body, "ignore_eos": True, "return_token_ids": True},
    ).choices[0]
    assert choice.token_ids == expected.token_ids == [17] * 6
    allowed = [40, 41, 42]
    choice = client.completions.create(
        model=MODEL_NAME, prompt="hello world", max_tokens=8, temperature=1.0, seed=1,
        extra_body={"allowed_token_ids": allowed, "ignore_eos": True, "return_token_ids": True},
    ).choices[0]
    assert len(choice.token_ids) == 8 and set(choice.token_ids) <= set(allowed)


def test_prompt_logprobs_and_echo_on_completions(client, llm):
    prompt = "the paged attention model"
    expected = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1), use_tqdm=False)[0]
    choice = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0, echo=True, extra_body={"prompt_logprobs": 1},
    ).choices[0]
    assert choice.text == prompt + expected.outputs[0].text
    rows = choice.model_extra["prompt_logprobs"]
    assert len(rows) == len(expected.prompt_token_ids) and rows[0] is None
    for row, want in zip(rows[1:], expected.prompt_logprobs[1:]):
        assert {int(t) for t in row} == set(want)
        assert all(abs(row[str(t)]["logprob"] - lp.logprob) < 1e-4 for t, lp in want.items())
