"""The offline API on a GPU: sleep / wake_up really return device memory, cpu_offload_gb keeps
weights in host memory and still gives the same tokens, structured outputs on the device.
Run with `pytest -m gpu tests/gpu/test_offline_api_gpu.py`."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from tiny_models import hf_greedy, make_tiny_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = [[5, 17, 99, 23, 8], list(range(30, 100)), [300]]
GIB = 1 << 30


def _release(llm) -> None:
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def _tokens(llm, prompts=PROMPTS, max_tokens=10):
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_returns_weights_and_kv_memory_to_the_device(qwen3_0_6b_folder, level):
    from pagedllm import LLM

    llm = LLM(str(qwen3_0_6b_folder), skip_tokenizer_init=True, load_format="dummy", max_model_len=1024,
              kv_cache_memory_bytes=2 * GIB)
    try:
        before_tokens = _tokens(llm)
        weight_bytes = llm.apply_model(lambda m: sum(p.numel() * p.element_size() for p in m.parameters()))[0]
        torch.cuda.synchronize()
        awake = torch.cuda.memory_allocated()
        llm.sleep(level=level)
        asleep = torch.cuda.memory_allocated()
        freed = awake - asleep
        # Both levels free the weights (level 1 keeps a host copy) and the 2 GiB of KV cache.
        assert freed >= 0.95 * (weight_bytes + 2 * GIB), (awake, asleep, weight_bytes)
        llm.wake_up()
        assert torch.cuda.memory_allocated() >= asleep + 0.95 * (weight_bytes + 2 * GIB)
        if level == 1:  # level 2 reloads dummy weights, which are random again
            assert _tokens(llm) == before_tokens
    finally:
        _release(llm)


def test_sleep_level_2_reloads_the_checkpoint_and_recaptures_graphs(tmp_path):
    from pagedllm import LLM

    path = make_tiny_checkpoint(tmp_path / "m", "qwen3")
    expected = hf_greedy(path, PROMPTS, 10)
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.2)
    try:
        assert _tokens(llm) == expected
        llm.sleep(level=2)
        llm.wake_up(tags=["weights"])
        llm.wake_up(tags=["kv_cache"])
        assert _tokens(llm) == expected
    finally:
        _release(llm)


def test_cpu_offload_keeps_weights_on_the_host_and_gives_the_same_tokens(tmp_path, qwen3_0_6b_folder):
    from pagedllm import LLM

    path = make_tiny_checkpoint(tmp_path / "m", "llama")
    expected = hf_greedy(path, PROMPTS, 10)
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.2, cpu_offload_gb=0.0002)
    try:
        on_host = llm.apply_model(lambda m: sum(p.numel() * p.element_size() for p in m.parameters() if p.device.type == "cpu"))[0]
        assert on_host >= 0.0002 * GIB
        assert _tokens(llm) == expected
    finally:
        _release(llm)

    common = dict(skip_tokenizer_init=True, load_format="dummy", max_model_len=1024, kv_cache_memory_bytes=GIB // 2)
    llm = LLM(str(qwen3_0_6b_folder), **common)
    full = llm.apply_model(lambda m: sum(p.numel() * p.element_size() for p in m.parameters() if p.is_cuda))[0]
    _release(llm)
    llm = LLM(str(qwen3_0_6b_folder), cpu_offload_gb=0.5, **common)
    try:
        offloaded = llm.apply_model(lambda m: sum(p.numel() * p.element_size() for p in m.parameters() if p.is_cuda))[0]
        assert full - offloaded >= 0.5 * GIB
        assert len(_tokens(llm)[0]) == 10
    finally:
        _release(llm)


def test_structured_outputs_on_the_gpu(tmp_path, tiny_bpe_tokenizer_dir):
    from pagedllm import LLM, SamplingParams, StructuredOutputsParams

    path = make_tiny_checkpoint(tmp_path / "m", "qwen3", vocab_size=520, tokenizer_dir=tiny_bpe_tokenizer_dir)
    llm = LLM(str(path), dtype="float32", gpu_memory_utilization=0.2)
    try:
        schema = {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["kind", "n"]}
        spec = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        outputs = llm.generate(["hello", "world"], SamplingParams(temperature=1.0, seed=0, max_tokens=100, structured_outputs=spec), use_tqdm=False)
        for output in outputs:
            value = json.loads(output.outputs[0].text)
            assert value["kind"] in ("a", "b") and 0 <= value["n"] <= 99
    finally:
        _release(llm)
