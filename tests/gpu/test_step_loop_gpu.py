"""The step loop on GPUs: async scheduling gives the tokens of sync scheduling with CUDA graphs
(one GPU, and two with the mp executor); the symmetric-memory all-reduce sums like NCCL, eagerly
and inside a CUDA graph; disable_custom_all_reduce=True gives the same tokens. Run with
`NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 pytest -m gpu
tests/gpu/test_step_loop_gpu.py`; the two-GPU tests skip with fewer GPUs."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from tiny_models import FAMILIES, hf_greedy, make_tiny_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

PROMPTS = [[5, 17, 99, 23, 8], list(range(30, 100)), list(range(30, 70)) + [11, 12], [300]]
ENGINE = dict(skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.3, max_num_batched_tokens=64)


def _outputs(llm):
    from pagedllm import SamplingParams

    params = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=9, ignore_eos=True, n=2),
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, repetition_penalty=1.2),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [[tuple(c.token_ids) for c in o.outputs] for o in outputs]


def _release(llm) -> None:
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("family", FAMILIES)
def test_async_scheduling_gives_sync_tokens_with_cuda_graphs(tmp_path, family):
    from pagedllm import LLM

    path = make_tiny_checkpoint(tmp_path / family, family)
    results = []
    for async_scheduling in (False, True):
        llm = LLM(str(path), async_scheduling=async_scheduling, **ENGINE)
        try:
            results.append(_outputs(llm))
        finally:
            _release(llm)
    assert results[0] == results[1]
    expected = hf_greedy(path, [PROMPTS[0]], 12)
    assert list(results[1][0][0]) == expected[0]


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_programmatic_dependent_launch_changes_no_result(tmp_path, monkeypatch, quantization):
    """The decode step's kernels launched with PDL (the default on Hopper: layers/ops/pdl.py)
    give the tokens and logprobs of plain launches bit for bit, in CUDA graphs."""
    from pagedllm import LLM, SamplingParams
    from pagedllm.layers.ops.pdl import _cuda_launch_options, pdl_launch_options

    path = make_tiny_checkpoint(tmp_path / "llama", "llama")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    results = []
    for pdl in ("0", "1"):
        monkeypatch.setenv("PAGEDLLM_PDL", pdl)
        _cuda_launch_options.cache_clear()  # the variable is read once per process and GPU
        llm = LLM(str(path), skip_tokenizer_init=True, dtype="bfloat16", quantization=quantization,
                  gpu_memory_utilization=0.3, max_num_batched_tokens=64)
        try:
            outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        finally:
            _release(llm)
        results.append([(tuple(c.token_ids), [{t: lp.logprob for t, lp in step.items()} for step in c.logprobs])
                        for o in outputs for c in o.outputs])
    assert results[0] == results[1]
    if torch.cuda.get_device_capability() >= (9, 0):
        assert pdl_launch_options(torch.device("cuda"))["USE_PDL"]  # the second run did use it


@two_gpus
def test_two_gpus_async_custom_all_reduce_and_nccl_agree(tmp_path):
    """tensor_parallel_size=2: sync + NCCL, async + symmetric-memory all-reduce (in graphs) and
    async + disable_custom_all_reduce give the same tokens, greedy ones equal transformers'."""
    from pagedllm import LLM

    path = make_tiny_checkpoint(tmp_path / "llama", "llama")
    results = []
    for options in (dict(async_scheduling=False, disable_custom_all_reduce=True),
                    dict(async_scheduling=True),
                    dict(async_scheduling=True, disable_custom_all_reduce=True)):
        llm = LLM(str(path), tensor_parallel_size=2, **options, **ENGINE)
        try:
            results.append(_outputs(llm))
        finally:
            _release(llm)
    assert results[0] == results[1] == results[2]
    assert list(results[0][0][0]) == hf_greedy(path, [PROMPTS[0]], 12)[0]


def _all_reduce_worker(rank: int, port: int, errors) -> None:
    try:
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        from pagedllm.distributed.communication import tensor_model_parallel_all_reduce
        from pagedllm.distributed.parallel_state import (
            destroy_distributed,
            get_custom_all_reduce,
            init_custom_all_reduce,
            init_distributed,
        )

        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        init_distributed(2, rank, "nccl", f"tcp://127.0.0.1:{port}", rank)
        init_custom_all_reduce(device, disable=False)
        assert get_custom_all_reduce() is not None, "the symmetric-memory all-reduce did not start"
        for dtype in (torch.bfloat16, torch.float32):
            for numel in (8, 4096, 4096 * 8, 4096 * 256):  # symmetric-memory sizes, then NCCL's
                generator = torch.Generator(device=device).manual_seed(numel)
                parts = [torch.randn(numel, device=device, dtype=dtype, generator=generator) for _ in range(2)]
                expected = (parts[0].float() + parts[1].float()).to(dtype)
                got = tensor_model_parallel_all_reduce(parts[rank].clone())
                torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
        # Inside a CUDA graph: replays see new inputs.
        x = torch.zeros(4096, device=device, dtype=torch.bfloat16)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            tensor_model_parallel_all_reduce(x.clone())
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = tensor_model_parallel_all_reduce(x)
        for value in (1.0, 2.5):
            x.fill_(value * (rank + 1))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.all(y == value * 3), (value, y[:4])
        destroy_distributed()
    except BaseException as error:  # reported to the parent
        import traceback

        errors.put(f"rank {rank}: {error!r}\n{traceback.format_exc()}")


@two_gpus
def test_symmetric_memory_all_reduce_sums_like_nccl_in_and_out_of_graphs():
    import torch.multiprocessing as mp

    from pagedllm.executor.base import get_open_port

    context = mp.get_context("spawn")
    errors = context.Queue()
    port = get_open_port()
    processes = [context.Process(target=_all_reduce_worker, args=(rank, port, errors)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages, "\n".join(messages)
    assert all(p.exitcode == 0 for p in processes)
