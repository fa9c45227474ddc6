"""`pagedllm serve` on a GPU (engine core with CUDA in its spawned process, CUDA graphs):
greedy completions equal `LLM` on the same GPU; streamed tokens equal non-streamed."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
from conftest import ServerProcess, children_of, wait_gone

from pagedllm import LLM, SamplingParams

pytestmark = pytest.mark.gpu
# float32: the server may batch the prompts differently from LLM; no near-ties flip a greedy token.
GPU_OPTIONS = dict(dtype="float32", device="cuda", max_model_len=256, gpu_memory_utilization=0.3, max_num_seqs=32)
PROMPTS = ["hello world", "the paged attention model", "café naïve 中文 🙂", "stop"]


def test_gpu_server_equals_llm_and_streams_the_same_tokens(serve_model_dir, tmp_path):
    for package in ("fastapi", "uvicorn", "zmq", "prometheus_client"):
        pytest.importorskip(package)
    llm = LLM(str(serve_model_dir), **GPU_OPTIONS)
    expected = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    llm.shutdown()
    del llm
    server = ServerProcess(serve_model_dir, ["--served-model-name", "tiny"], tmp_path / "server.log", engine_options=GPU_OPTIONS)
    try:
        server.wait_until_healthy(timeout=600)
        children = children_of(server.process.pid)
        body = {"model": "tiny", "prompt": PROMPTS, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        whole = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
        assert [c["token_ids"] for c in whole["choices"]] == [o.outputs[0].token_ids for o in expected]
        assert [c["text"] for c in whole["choices"]] == [o.outputs[0].text for o in expected]
        streamed: dict[int, list[int]] = {}
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        streamed.setdefault(choice["index"], []).extend(choice["token_ids"] or [])
        assert [streamed[i] for i in range(len(PROMPTS))] == [o.outputs[0].token_ids for o in expected]
        assert server.stop(signal.SIGTERM) == 0, server.log()
        assert wait_gone(children) == []
    finally:
        server.stop(signal.SIGKILL)
