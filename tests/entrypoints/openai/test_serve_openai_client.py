"""`pagedllm serve` with the official openai client: results equal `LLM`'s, streaming equals
non-streaming, concurrency, errors, auth, metrics, aborts, and a clean shutdown."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import pytest
from conftest import API_KEY, CHAT_TEMPLATE, ENGINE_OPTIONS, MODEL_NAME, children_of, engine_core_pid, wait_gone

from pagedllm import LLM, SamplingParams

# The GPU machine runs the suite from source, maybe without the server's packages.
openai = pytest.importorskip("openai")
for _package in ("fastapi", "uvicorn", "zmq", "prometheus_client"):
    pytest.importorskip(_package)

# One server for the whole module (conftest's `server`, ~10 s to start on 2 cores).
pytestmark = pytest.mark.slow

PROMPTS = ["hello world", "the paged attention model", "café naïve 中文 🙂"]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def llm(serve_model_dir):
    llm = LLM(str(serve_model_dir), **ENGINE_OPTIONS)
    yield llm
    llm.shutdown()


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_completions_equal_llm_generate(client, llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    expected = llm.generate(PROMPTS, params, use_tqdm=False)
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=10, temperature=0,
                                         logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1, 2]
    for choice, want in zip(response.choices, expected):
        completion = want.outputs[0]
        assert choice.text == completion.text and choice.finish_reason == "length"
        assert len(choice.logprobs.token_logprobs) == 10
        for got, entry, token_id in zip(choice.logprobs.token_logprobs, completion.logprobs, completion.token_ids):
            assert abs(got - entry[token_id].logprob) < 1e-4
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert response.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert response.usage.completion_tokens == 30

    # A single string and token ids give the same text.
    single = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    ids = client.completions.create(model=MODEL_NAME, prompt=expected[1].prompt_token_ids, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert single.choices[0].text == ids.choices[0].text == expected[1].outputs[0].text


def test_sampling_extras_and_seed_equal_llm(client, llm):
    extras = dict(top_k=5, min_p=0.05, repetition_penalty=1.2, min_tokens=3, ignore_eos=True)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=8, presence_penalty=0.5,
                            frequency_penalty=0.3, n=2, **extras)
    expected = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0.8, top_p=0.9,
                                         seed=7, n=2, presence_penalty=0.5, frequency_penalty=0.3, extra_body=extras)
    assert [c.text for c in response.choices] == [c.text for c in expected.outputs]


def test_chat_equals_llm_chat(client, llm):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    expected = llm.chat(MESSAGES, params, use_tqdm=False, chat_template=CHAT_TEMPLATE)[0]
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=10, temperature=0,
                                              logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert len(choice.logprobs.content) == 10 and all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    for got, entry, token_id in zip(choice.logprobs.content, expected.outputs[0].logprobs, expected.outputs[0].token_ids):
        assert abs(got.logprob - entry[token_id].logprob) < 1e-4


def test_stop_strings_match_llm(client, llm):
    full = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    stop = full[5:8]
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert response.choices[0].text == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_streamed_text_equals_non_streamed(client):
    kwargs = dict(model=MODEL_NAME, prompt=PROMPTS, max_tokens=12, temperature=0, n=2, seed=3, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: "length" for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 72

    chat_kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    chat_whole = client.chat.completions.create(**chat_kwargs)
    chat_chunks = list(client.chat.completions.create(**chat_kwargs, stream=True, stream_options={"include_usage": True}))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices) == chat_whole.choices[0].message.content
    assert chat_chunks[-1].usage.total_tokens == chat_whole.usage.total_tokens


def test_stream_ends_with_done(server):
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_32_concurrent_requests_each_return_what_they_return_alone(server, llm):
    prompts = [f"{PROMPTS[i % 3]} {i}" for i in range(32)]
    max_tokens = [4 + i % 9 for i in range(32)]
    expected = [llm.generate(p, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
                for p, m in zip(prompts[:4], max_tokens[:4])]
    expected += [o.outputs[0].text for o in llm.generate(
        prompts[4:], [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens[4:]], use_tqdm=False)]

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as aclient:
            async def one(prompt, tokens, stream):
                kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True})
                if not stream:
                    return (await aclient.completions.create(**kwargs)).choices[0].text
                return "".join([c.choices[0].text async for c in await aclient.completions.create(**kwargs, stream=True)])
            return await asyncio.gather(*(one(p, m, i % 2 == 0) for i, (p, m) in enumerate(zip(prompts, max_tokens))))

    assert asyncio.run(run()) == expected


def _status_and_error(response: httpx.Response) -> tuple[int, dict]:
    return response.status_code, response.json()["error"]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    post = lambda path, body, **kw: httpx.post(server.url + path, json=body, headers=kw.get("headers", headers), timeout=30)  # noqa: E731
    status, error = _status_and_error(post("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "temperature": -1}))
    assert status == 400 and error["code"] == 400 and error["type"] == "BadRequestError"
    assert "temperature" in error["message"] and "-1" in error["message"]
    status, error = _status_and_error(post("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "n": "many"}))
    assert status == 400 and "n" in error["message"]
    status, error = _status_and_error(post("/v1/completions", {"model": MODEL_NAME, "prompt": [5] * 300}))
    assert status == 400 and "256" in error["message"] and "300" in error["message"] and "45 more" in error["message"]
    status, error = _status_and_error(post("/v1/completions", {"model": MODEL_NAME, "prompt": [5] * 200, "max_tokens": 100}))
    assert status == 400 and "44 tokens too many" in error["message"]
    status, error = _status_and_error(post("/v1/chat/completions", {"model": MODEL_NAME, "messages": MESSAGES, "top_logprobs": 2}))
    assert status == 400 and "logprobs" in error["message"]
    status, error = _status_and_error(post("/v1/completions", {"model": MODEL_NAME, "prompt": [999999]}))
    assert status == 400 and "vocabulary" in error["message"]
    image_part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    image_message = [{"role": "user", "content": [image_part, {"type": "text", "text": "hi"}]}]
    status, error = _status_and_error(post("/v1/chat/completions", {"model": MODEL_NAME, "messages": image_message}))
    assert status == 400 and "image" in error["message"]
    status, error = _status_and_error(post("/v1/completions", {"model": "gpt-4", "prompt": "hi"}))
    assert status == 404 and error["code"] == 404 and "gpt-4" in error["message"]
    for bad_headers in ({}, {"Authorization": "Bearer wrong"}):
        status, error = _status_and_error(post("/v1/completions", {"model": MODEL_NAME, "prompt": "hi"}, headers=bad_headers))
        assert status == 401 and error["code"] == 401
    assert httpx.get(server.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="hi", top_p=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    assert client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).choices[0].finish_reason is not None


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        match = re.match(r'^(pagedllm:\w+)\{model_name="tiny"\} ([0-9.e+-]+)$', line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def test_aborted_stream_frees_its_blocks_and_metrics_count(server):
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0] * 6, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        lines = response.iter_lines()
        next(lines)
        next(lines)
        assert _metrics(server)["pagedllm:num_requests_running"] == 1
    deadline = time.monotonic() + 10
    while (metrics := _metrics(server))["pagedllm:num_requests_running"] or metrics["pagedllm:kv_cache_usage_perc"]:
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)
    assert metrics["pagedllm:num_requests_waiting"] == 0

    # A non-streaming client that gives up is aborted too (unless it was already done).
    try:
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 230}, timeout=0.3,
                   headers={"Authorization": f"Bearer {API_KEY}"})
        gave_up = False
    except httpx.TimeoutException:
        gave_up = True
    deadline = time.monotonic() + 10
    while (metrics := _metrics(server))["pagedllm:num_requests_running"] or metrics["pagedllm:kv_cache_usage_perc"]:
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)
    if gave_up:
        assert server.log().count("Aborted request") == 2
    assert metrics["pagedllm:prompt_tokens_total"] > 0 and metrics["pagedllm:generation_tokens_total"] > 0
    assert metrics["pagedllm:time_to_first_token_seconds_count"] > 0
    assert metrics["pagedllm:inter_token_latency_seconds_count"] > 0
    assert "vllm:num_requests_running" in httpx.get(server.url + "/metrics").text


def test_dead_engine_core_makes_health_503_then_sigterm_leaves_no_process(server):
    # Runs last: it kills the module's server.
    core = engine_core_pid(server.process.pid)
    os.kill(core, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    response = httpx.post(server.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi"},
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 500 and "EngineDeadError" in response.json()["error"]["message"]
    children = children_of(server.process.pid)
    assert server.stop(signal.SIGTERM) == 0, server.log()
    assert wait_gone(children) == []
