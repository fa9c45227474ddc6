"""Images in /v1/chat/completions: a data: URL content part gives what `LLM.chat` gives with
the same message on the same tiny Qwen2-VL checkpoint; file paths and remote URLs are refused
(the server reads no files), and so is an image for a text-only model (in test_serve_openai_client)."""

from __future__ import annotations

import base64
import io
import signal

import openai
import pytest
from conftest import ServerProcess
from tiny_vl_models import random_image, tiny_vl_checkpoints  # noqa: F401 (fixture)

from pagedllm import LLM, SamplingParams

pytestmark = pytest.mark.slow
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
OPTIONS = dict(dtype="float32", device="cpu", max_model_len=512, kv_cache_memory_bytes=1 << 23,
               limit_mm_per_prompt='{"image":1,"video":0}')


@pytest.fixture(scope="module")
def vl_server(tiny_vl_checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vl_template")
    (folder / "template.jinja").write_text(TEMPLATE)
    process = ServerProcess(
        tiny_vl_checkpoints["qwen2_vl"], ["--served-model-name", "vl", "--chat-template", str(folder / "template.jinja")],
        folder / "server.log", engine_options=OPTIONS,
    )
    try:
        process.wait_until_healthy()
        yield process
    finally:
        process.stop(signal.SIGKILL)


def _data_url() -> tuple[str, object]:
    image = random_image(56, 56, seed=5)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), image


def test_chat_with_an_inline_image_equals_llm_chat(vl_server, tiny_vl_checkpoints):
    url, _ = _data_url()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what is it"}]}]
    client = openai.OpenAI(base_url=vl_server.url + "/v1", api_key="none")
    reply = client.chat.completions.create(model="vl", messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True, "return_token_ids": True})
    llm = LLM(str(tiny_vl_checkpoints["qwen2_vl"]), dtype="float32", max_model_len=512,
              limit_mm_per_prompt={"image": 1, "video": 0})
    try:
        expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                            use_tqdm=False, chat_template=TEMPLATE)[0]
    finally:
        llm.shutdown()
    assert reply.choices[0].token_ids == list(expected.outputs[0].token_ids)
    assert reply.choices[0].message.content == expected.outputs[0].text
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)


@pytest.mark.parametrize("url", ["file:///etc/hostname", "https://example.com/cat.png"])
def test_file_and_remote_image_urls_are_refused(vl_server, url):
    client = openai.OpenAI(base_url=vl_server.url + "/v1", api_key="none")
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "hi"}]}]
    with pytest.raises(openai.BadRequestError, match="data: URL"):
        client.chat.completions.create(model="vl", messages=messages, max_tokens=4)
