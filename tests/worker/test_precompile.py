"""The start-up compile pass (worker/precompile.py) runs the model on every shape the engine's
steps will launch: the profile step without a KV cache, the dummy steps' prefill and mixed
steps and each decode batch size over a temporary cache, which is unbound afterwards. The
Triton side is GPU-only (tests/gpu/test_precompile_gpu.py); here the pass runs on the CPU's torch
layers to check the shapes and the clean-up."""

from __future__ import annotations

import contextlib

from pagedllm import LLM
from pagedllm.worker import precompile


def test_the_pass_visits_each_step_shape_and_leaves_no_kv_cache(tiny_checkpoints, monkeypatch):
    llm = LLM(str(tiny_checkpoints["llama"]), skip_tokenizer_init=True, dtype="float32",
              kv_cache_memory_bytes=1 << 22, max_num_batched_tokens=64, max_model_len=64)
    runner = llm.llm_engine.executor.worker.model_runner
    kv_caches = runner.kv_caches
    runner.kv_caches = []
    for layer in runner.attention_layers:
        layer.kv_cache = None

    @contextlib.contextmanager
    def no_triton(max_workers):
        yield {"variants": 0}

    monkeypatch.setattr(precompile, "triton_compile_only", no_triton)
    steps = []
    hook = runner.model.register_forward_hook(
        lambda module, args, output: steps.append((args[0].shape[0], runner.attention_layers[0].kv_cache is not None))
    )
    try:
        precompile.precompile_kernels(runner, decode_batch_sizes=(4, 1, 2, 1, 32, 16, 24, 40, 48), max_workers=2)
    finally:
        hook.remove()
    # Beyond 8 rows: the first multiple of 16, the first other size and the largest.
    assert steps == [
        (64, False), (17, True), (16, True), (1, True), (2, True), (4, True), (16, True), (24, True), (48, True)
    ]
    assert runner.kv_caches == [] and all(layer.kv_cache is None for layer in runner.attention_layers)

    runner.kv_caches = kv_caches
    for layer, cache in zip(runner.attention_layers, kv_caches):
        layer.kv_cache = cache
    outputs = llm.generate({"prompt_token_ids": [5, 6, 7]}, use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) > 0


def test_launches_that_differ_only_in_their_tensors_addresses_share_one_key():
    import torch

    kernel = object()
    first, second = torch.zeros(64), torch.ones(64)
    key = precompile._launch_key(kernel, (first, 4096, None, 1.5), {"BLOCK": 64, "shape": (8, 16)})
    assert key == precompile._launch_key(kernel, (second, 4096, None, 1.5), {"BLOCK": 64, "shape": (8, 16)})
    # Each thing Triton specializes on changes the key: dtype, 16-byte alignment, values,
    # bool against int, the kernel.
    for args, kwargs in [
        ((first.half(), 4096, None, 1.5), {"BLOCK": 64, "shape": (8, 16)}),
        ((first[1:], 4096, None, 1.5), {"BLOCK": 64, "shape": (8, 16)}),
        ((first, 4095, None, 1.5), {"BLOCK": 64, "shape": (8, 16)}),
        ((first, 4096, None, 1.5), {"BLOCK": True, "shape": (8, 16)}),
        ((first, 4096, None, 1.5), {"BLOCK": 64, "shape": (8, 17)}),
    ]:
        assert precompile._launch_key(kernel, args, kwargs) != key
    assert precompile._launch_key(object(), (first, 4096, None, 1.5), {"BLOCK": 64, "shape": (8, 16)}) != key
    # An argument of a type the key does not know is handed to Triton every time.
    assert precompile._launch_key(kernel, (first, object()), {}) is None
    assert precompile._launch_key(kernel, (first,), {"dtype": torch.float16}) is None
