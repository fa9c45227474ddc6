"""`pagedllm serve` behaves as `vllm serve` where clients notice: vLLM's server flags
(request logging, --root-path, --disable-fastapi-docs, --response-role,
--enable-prompt-tokens-details, --return-tokens-as-token-ids, --chat-template-content-format),
stream_options checks and continuous usage, completions' logprobs (the sampled token plus the
top k), echo with logprobs over the prompt, echo with max_tokens=0, /tokenize and /detokenize,
CORS, truncate_prompt_tokens, chat prompt_logprobs, and the continue_final_message check."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import API_KEY, MODEL_NAME, serve

openai = pytest.importorskip("openai")
for _package in ("fastapi", "uvicorn", "zmq", "prometheus_client"):
    pytest.importorskip(_package)

# One server for the whole module (~10 s to start on 2 cores).
pytestmark = pytest.mark.slow

PROMPT = "the paged attention model"
MESSAGES = [{"role": "user", "content": "hello world"}]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
STREAM_OPTIONS_ERROR = "Stream options can only be defined when `stream=True`."
FLAGS = [
    "--enable-log-requests", "--max-log-len", "7", "--disable-frontend-multiprocessing",
    "--disable-fastapi-docs", "--root-path", "/api", "--response-role", "bot", "--enable-prompt-tokens-details",
    "--return-tokens-as-token-ids", "--chat-template-content-format", "auto",
    "--allowed-origins", '["https://a.example"]',
]


@pytest.fixture(scope="module")
def server(serve_model_dir, chat_template_file, tmp_path_factory):
    # conftest's `client` then talks to this server.
    yield from serve(serve_model_dir, chat_template_file, tmp_path_factory.mktemp("compat_log") / "server.log", FLAGS)


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL_NAME, **body}, headers=HEADERS, timeout=60)


def _events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json={"model": MODEL_NAME, "stream": True, **body}, headers=HEADERS,
                      timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_vllm_server_flags_are_accepted_and_act(server, client):
    # --disable-fastapi-docs: no /docs, /redoc, /openapi.json.
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 404
    # --root-path: the app also answers under the prefix a proxy would strip, still behind the key.
    assert httpx.get(server.url + "/api/v1/models", headers=HEADERS).json()["data"][0]["id"] == MODEL_NAME
    assert httpx.get(server.url + "/api/v1/models").status_code == 401
    assert httpx.get(server.url + "/v1/models", headers=HEADERS).status_code == 200
    # --response-role: the role of chat answers, streamed or not.
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=3)
    assert chat.choices[0].message.role == "bot"
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=3, stream=True))
    assert chunks[0].choices[0].delta.role == "bot"
    # --enable-log-requests with --max-log-len 7: one INFO line per request, the prompt cut to 7.
    logged = client.completions.create(model=MODEL_NAME, prompt="a prompt that is longer than seven", max_tokens=2,
                                       extra_body={"request_id": "logged-request"})
    assert logged.id == "cmpl-logged-request"  # vLLM's id: the prefix, then the body's request_id
    log = server.log()
    assert "Received request cmpl-logged-request: prompt: 'a promp'" in log
    assert "that is longer" not in log


def test_prompt_tokens_details_report_cached_prompt_tokens(client):
    prompt = " ".join(["the paged attention model"] * 12)
    client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2)
    again = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < again.usage.prompt_tokens
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(server):
    body = {"prompt": PROMPT, "max_tokens": 5, "logprobs": 2, "return_token_ids": True}
    choice = _post(server, "/v1/completions", body).json()["choices"][0]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(key.startswith("token_id:") for top in choice["logprobs"]["top_logprobs"] for key in top)
    body = {"messages": MESSAGES, "max_tokens": 5, "logprobs": True, "top_logprobs": 2, "return_token_ids": True}
    choice = _post(server, "/v1/chat/completions", body).json()["choices"][0]
    assert [t["token"] for t in choice["logprobs"]["content"]] == [f"token_id:{t}" for t in choice["token_ids"]]
    # The request's own return_tokens_as_token_ids wins over the server's, as in vLLM.
    body = {"prompt": PROMPT, "max_tokens": 5, "logprobs": 0, "return_tokens_as_token_ids": False}
    tokens = _post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]["tokens"]
    assert not any(token.startswith("token_id:") for token in tokens)


def test_chat_template_content_format_auto_gives_parts_to_a_template_that_loops_over_them(server):
    loops = "{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}{{ p['text'] }}{% endfor %}.{% endfor %}"
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}.{% endfor %}"
    ids = [
        _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "chat_template": template,
                                                "return_token_ids": True}).json()["prompt_token_ids"]
        for template in (loops, plain)
    ]
    assert ids[0] == ids[1]


def test_chat_tools_go_to_the_template(server):
    """`tools` reach the chat template as transformers' `tools` (no tool-call parsing); a
    tool_choice that would need parsing is a 400."""
    template = "{{ tools | length }} tools: {{ tools[0]['function']['name'] }}.{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with_tools = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "chat_template": template,
                                                        "tools": tools, "return_token_ids": True})
    assert with_tools.status_code == 200, with_tools.text
    spelled_out = "1 tools: get_weather.{% for m in messages %}{{ m['content'] }}{% endfor %}"
    without = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "chat_template": spelled_out,
                                                     "return_token_ids": True})
    assert with_tools.json()["prompt_token_ids"] == without.json()["prompt_token_ids"]
    forced = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "chat_template": template,
                                                    "tools": tools, "tool_choice": "required"})
    assert forced.status_code == 400 and "tool_choice" in forced.json()["error"]["message"]


def test_stream_options_without_stream_is_a_400(server):
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MESSAGES})):
        for stream in ({}, {"stream": False}):
            response = _post(server, path, {**body, **stream, "stream_options": {"include_usage": True}})
            assert response.status_code == 400 and response.json()["error"]["message"] == STREAM_OPTIONS_ERROR


def test_continuous_usage_stats_put_usage_in_every_chunk(server):
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"prompt": PROMPT, "max_tokens": 6, "ignore_eos": True, "stream_options": options}
    events = _events(server, "/v1/completions", body)
    *chunks, last = events
    prompt_tokens = last["usage"]["prompt_tokens"]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    assert chunks and all(chunk["usage"]["prompt_tokens"] == prompt_tokens for chunk in chunks)
    completion_tokens = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert completion_tokens == sorted(completion_tokens) and completion_tokens[-1] == 6
    assert all(c["usage"]["total_tokens"] == prompt_tokens + c["usage"]["completion_tokens"] for c in chunks)

    body = {"messages": MESSAGES, "max_tokens": 6, "ignore_eos": True, "stream_options": options}
    *chunks, last = _events(server, "/v1/chat/completions", body)
    assert chunks[0]["usage"]["completion_tokens"] == 0 and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(chunk["usage"]["prompt_tokens"] == last["usage"]["prompt_tokens"] for chunk in chunks)
    # Without it, only the last chunk has usage.
    events = _events(server, "/v1/completions", {**body, "prompt": PROMPT, "stream_options": {"include_usage": True}})
    assert all(event["usage"] is None for event in events[:-1])


def test_completion_top_logprobs_hold_the_sampled_token_and_the_top_k(server):
    base = {"prompt": PROMPT, "max_tokens": 16, "ignore_eos": True, "temperature": 1.5, "seed": 11}
    zero = _post(server, "/v1/completions", {**base, "logprobs": 0})
    logprobs = zero.json()["choices"][0]["logprobs"]
    assert [list(top) for top in logprobs["top_logprobs"]] == [[token] for token in logprobs["tokens"]]
    logprobs = _post(server, "/v1/completions", {**base, "logprobs": 2}).json()["choices"][0]["logprobs"]
    tops = logprobs["top_logprobs"]
    assert all(token in top for token, top in zip(logprobs["tokens"], tops))
    assert all(2 <= len(top) <= 3 for top in tops) and any(len(top) == 3 for top in tops)


def test_echo_with_logprobs_covers_the_prompt_then_the_output(server):
    base = {"prompt": PROMPT, "max_tokens": 5, "ignore_eos": True, "temperature": 0, "logprobs": 2,
            "return_tokens_as_token_ids": False}
    plain = _post(server, "/v1/completions", base).json()["choices"][0]
    reference = _post(server, "/v1/completions", {**base, "prompt_logprobs": 2, "return_token_ids": True}).json()
    prompt_rows = reference["choices"][0]["prompt_logprobs"]
    num_prompt_tokens = len(reference["choices"][0]["prompt_token_ids"])
    echoed = _post(server, "/v1/completions", {**base, "echo": True}).json()["choices"][0]
    logprobs = echoed["logprobs"]
    assert echoed["text"].startswith(PROMPT) and echoed["text"].endswith(plain["text"])
    assert len(logprobs["tokens"]) == num_prompt_tokens + 5
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for got, row, token_id in zip(logprobs["token_logprobs"][1:num_prompt_tokens], prompt_rows[1:],
                                  reference["choices"][0]["prompt_token_ids"][1:]):
        assert abs(got - row[str(token_id)]["logprob"]) < 1e-4
    assert logprobs["tokens"][num_prompt_tokens:] == plain["logprobs"]["tokens"]
    for got, want in zip(logprobs["token_logprobs"][num_prompt_tokens:], plain["logprobs"]["token_logprobs"]):
        assert abs(got - want) < 1e-4
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0
    assert all(b - a == len(token) for a, b, token in zip(offsets, offsets[1:], logprobs["tokens"]))

    # Streamed: the same arrays, split over the chunks.
    streamed: dict[str, list] = {"tokens": [], "token_logprobs": [], "text_offset": [], "top_logprobs": []}
    text = ""
    for event in _events(server, "/v1/completions", {**base, "echo": True}):
        for choice in event["choices"]:
            text += choice["text"]
            for key, values in streamed.items():
                values.extend(choice["logprobs"][key])
    assert text == echoed["text"]
    assert streamed["tokens"] == logprobs["tokens"] and streamed["text_offset"] == offsets
    assert streamed["top_logprobs"][0] is None and len(streamed["token_logprobs"]) == len(logprobs["token_logprobs"])
    # Without logprobs the prompt is streamed once, ahead of the output.
    no_logprobs = {key: value for key, value in base.items() if key != "logprobs"}
    events = _events(server, "/v1/completions", {**no_logprobs, "echo": True, "n": 2})
    for index in (0, 1):
        assert "".join(c["text"] for e in events for c in e["choices"] if c["index"] == index) == echoed["text"]


def test_echo_with_max_tokens_0_returns_the_prompt_only(server):
    body = {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1, "return_tokens_as_token_ids": False}
    response = _post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    choice, usage = response.json()["choices"][0], response.json()["usage"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert usage["completion_tokens"] == 0 and len(choice["logprobs"]["tokens"]) == usage["prompt_tokens"]
    assert choice["logprobs"]["token_logprobs"][0] is None and all(
        lp is not None for lp in choice["logprobs"]["token_logprobs"][1:])
    events = _events(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert "".join(c["text"] for e in events for c in e["choices"]) == PROMPT
    assert events[-1]["usage"]["completion_tokens"] == 0
    no_logprobs = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True}).json()
    assert no_logprobs["choices"][0]["text"] == PROMPT and no_logprobs["choices"][0]["logprobs"] is None
    # Without echo, max_tokens=0 stays an error.
    response = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0})
    assert response.status_code == 400 and "max_tokens" in response.json()["error"]["message"]


def test_tokenize_and_detokenize(server, serve_model_dir, chat_template_file):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(serve_model_dir)
    # As in vLLM, these two routes sit outside /v1 and need no key.
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert tokens["tokens"] == tokenizer.encode(PROMPT) and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] > 0 and tokens["token_strs"] == tokenizer.convert_ids_to_tokens(tokens["tokens"])
    templated = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}).json()
    expected = tokenizer.apply_chat_template(MESSAGES, chat_template=chat_template_file.read_text(),
                                             add_generation_prompt=True, tokenize=False)
    assert templated["tokens"] == tokenizer.encode(expected, add_special_tokens=False)
    text = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == tokenizer.decode(tokens["tokens"])
    assert httpx.post(server.url + "/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert httpx.post(server.url + "/tokenize", json={"prompt": "a", "model": "nope"}).status_code == 404


def test_cors_answers_allowed_origins_only(server):
    preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}
    response = httpx.options(server.url + "/v1/completions", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://a.example"
    other = httpx.get(server.url + "/v1/models", headers={**HEADERS, "Origin": "https://b.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_truncate_prompt_tokens_and_chat_prompt_logprobs(server, client):
    long_prompt = " ".join([PROMPT] * 10)
    truncated = client.completions.create(model=MODEL_NAME, prompt=long_prompt, max_tokens=2,
                                          extra_body={"truncate_prompt_tokens": 5})
    assert truncated.usage.prompt_tokens == 5
    assert _post(server, "/v1/completions", {"prompt": PROMPT, "truncate_prompt_tokens": 0}).status_code == 400
    body = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "prompt_logprobs": 1}).json()
    rows = body["prompt_logprobs"]
    assert len(rows) == body["usage"]["prompt_tokens"] and rows[0] is None
    assert all(1 <= len(row) <= 2 for row in rows[1:])


def test_continue_final_message_with_add_generation_prompt_is_a_400(server):
    messages = [*MESSAGES, {"role": "assistant", "content": "The answer"}]
    both = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2, "continue_final_message": True,
                                                   "add_generation_prompt": True})
    assert both.status_code == 400
    assert "Cannot set both `continue_final_message` and `add_generation_prompt` to True." in both.json()["error"]["message"]
    alone = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2, "continue_final_message": True})
    assert alone.status_code == 200


def test_model_cards_carry_vllms_fields(server):
    card = httpx.get(server.url + "/v1/models", headers=HEADERS).json()["data"][0]
    assert card["owned_by"] == "vllm" and card["permission"] == [] and "parent" in card


def test_x_request_id_names_the_response(server):
    headers = {**HEADERS, "X-Request-Id": "from-header"}
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2, "request_id": "from-body"}
    completion = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=60).json()
    assert completion["id"] == "cmpl-from-header"
    chat = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}).json()
    assert chat["id"].startswith("chatcmpl-")


def test_chat_echo_and_use_beam_search(server):
    messages = [*MESSAGES, {"role": "assistant", "content": "The answer is"}]
    body = {"messages": messages, "max_tokens": 3, "temperature": 0, "add_generation_prompt": False,
            "continue_final_message": True}
    plain = _post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    echoed = _post(server, "/v1/chat/completions", {**body, "echo": True}).json()["choices"][0]["message"]["content"]
    assert echoed == "The answer is" + plain
    streamed = "".join(e["choices"][0]["delta"].get("content") or ""
                       for e in _events(server, "/v1/chat/completions", {**body, "echo": True}) if e["choices"])
    assert streamed == echoed
    refused = _post(server, "/v1/completions", {"prompt": PROMPT, "use_beam_search": True, "n": 2})
    assert refused.status_code == 400 and "use_beam_search" in refused.json()["error"]["message"]
