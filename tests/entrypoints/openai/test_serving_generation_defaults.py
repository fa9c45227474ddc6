"""The server's SamplingParams from a request body: fields the client leaves unset take the
model's generation_config.json defaults (as vLLM's server does), set ones win. No server."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402
from pagedllm.entrypoints.openai.serving_engine import OpenAIServing, RequestError  # noqa: E402

DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "max_tokens": 50}


def _serving(defaults: dict) -> OpenAIServing:
    engine = SimpleNamespace(
        model_config=SimpleNamespace(max_model_len=256), tokenizer=None,
        frontend=SimpleNamespace(sampling_overrides=dict(defaults)),
    )
    return OpenAIServing(engine, ["tiny"])


def _params(serving: OpenAIServing, request, num_prompt_tokens: int = 10):
    max_tokens = serving.resolve_max_tokens(num_prompt_tokens, getattr(request, "max_completion_tokens", None) or request.max_tokens)
    return serving.sampling_params(request, max_tokens, None)


def test_unset_fields_take_the_generation_config_defaults():
    params = _params(_serving(DEFAULTS), ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]))
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (0.6, 0.95, 20, 0.05, 1.1)
    assert params.max_tokens == 50


def test_fields_the_client_sets_win_and_max_new_tokens_caps_as_in_vllm():
    # Not temperature 0: greedy decoding resets top_k / top_p / min_p, as in vLLM.
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.5, top_k=5, max_tokens=80)
    params = _params(_serving(DEFAULTS), request)
    assert params.temperature == 0.5 and params.top_k == 5 and params.top_p == 0.95
    assert params.max_tokens == 50  # vLLM takes the smallest of max_tokens, max_new_tokens and the room left
    assert _params(_serving(DEFAULTS), CompletionRequest(prompt="hi")).max_tokens == 16  # completions' default


def test_without_a_generation_config_the_openai_defaults_apply():
    params = _params(_serving({}), ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]), 56)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (1.0, 1.0, 0, 0.0, 1.0)
    assert params.max_tokens == 200  # all the room left in max_model_len


def test_structured_output_extras_map_to_structured_outputs_params():
    serving = _serving({})
    request = CompletionRequest(prompt="x", guided_choice=["a", "b"], logit_bias={"7": 3.5}, bad_words=["no"])
    params = _params(serving, request)
    assert params.structured_outputs.choice == ["a", "b"] and params.logit_bias == {7: 3.5} and params.bad_words == ["no"]
    request = CompletionRequest(prompt="x", response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}})
    assert _params(serving, request).structured_outputs.json == {"type": "object"}
    with pytest.raises(RequestError, match="one output constraint"):
        _params(serving, CompletionRequest(prompt="x", guided_regex="a", response_format={"type": "json_object"}))
