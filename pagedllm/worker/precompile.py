"""Start-up compilation of the engine's Triton kernels, all at once on a thread pool.

On a machine with an empty Triton cache each kernel variant used to compile when the start-up
profile, the CUDA graph capture or the dummy steps first launched it, one after another (most
of a 13.7 s cold start of Qwen3-0.6B on an H200, 2.8 s warm). Here, before the profile, the
model code runs once more on the shapes the engine will run, with every Triton launch turned
into a compile submitted to a thread pool (Triton's AsyncCompileMode; its MLIR and LLVM passes
and ptxas run without the GIL), so the variants compile side by side, and exactly those the
shapes need: the specializations come from the real launch arguments, not from a list kept
beside the kernels.

Kernels do not run in this pass, so what they would have written holds garbage. Only model
forwards on inputs built here run in it, and their results are thrown away; their torch ops
never index with a kernel's output. The sampler's random path is left out for that reason
(it draws from the logits), and its greedy argmax is called directly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from pagedllm.forward_context import set_forward_context
from pagedllm.worker.input_batch import build_dummy_inputs, build_profile_inputs

if TYPE_CHECKING:
    from pagedllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# The dummy steps' shapes (model_runner.run_dummy_steps): a 17-token prefill, and a 15-token
# prefill mixed with one decode row; 16 and 17 cover both sides of Triton's divisible-by-16
# specialization of token counts.
_PREFILL_QUERY_LENS = ((17,), (1, 15))
# Decode rows that take the Triton GEMV and argmax paths (layers/ops/gemv.py, sampler.py).
_FEW_ROWS = 8


@contextlib.contextmanager
def triton_compile_only(max_workers: int) -> Iterator[dict[str, int]]:
    """Inside, a Triton launch from this thread compiles its kernel for the launch's arguments
    on a pool of `max_workers` threads and returns at once without running it. On exit every
    compile has finished and its kernel sits, loaded, in the JIT's in-memory cache, so the
    launches that follow compile nothing. Yields a dict whose "variants" is filled in on exit.

    A compile or load that fails is dropped: the real launch tries again and raises its own
    error."""
    from triton.runtime import jit
    from triton.runtime._async_compile import AsyncCompileMode

    original_run = jit.JITFunction.run
    owner = threading.get_ident()
    submitted: dict[tuple[object, ...], object] = {}

    def compile_only_run(self, *args, grid, warmup, **kwargs):  # type: ignore[no-untyped-def]
        if threading.get_ident() != owner:  # other threads keep launching normally
            return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        key = _launch_key(self, args, kwargs)
        if key is None:
            return original_run(self, *args, grid=grid, warmup=True, **kwargs)
        if key not in submitted:
            submitted[key] = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        return submitted[key]

    stats = {"variants": 0}
    with ThreadPoolExecutor(max_workers, thread_name_prefix="pagedllm-triton-compile") as pool:
        mode = AsyncCompileMode(pool, ignore_errors=True)
        with mode:  # its exit waits for every compile and files the kernels
            jit.JITFunction.run = compile_only_run
            try:
                yield stats
            finally:
                jit.JITFunction.run = original_run
            future_kernels = list(mode.future_kernels.values())
        stats["variants"] = len(future_kernels)
        # A kernel's first launch also builds its launcher (on triton 3.6, C code through the
        # host compiler, ~0.1-0.5 s each when not cached) and loads its binary: done here
        # side by side too, on this thread's device.
        device = torch.cuda.current_device()
        kernels = [future.kernel for future in future_kernels if getattr(future, "kernel", None) is not None]
        list(pool.map(lambda kernel: _load(kernel, device), kernels))


class _NoKey(Exception):
    """An argument of a type _argument_key does not know."""


def _launch_key(kernel: object, args: tuple[object, ...], kwargs: dict[str, object]) -> tuple[object, ...] | None:
    """A key at least as fine as Triton's specialization of a launch: tensors by dtype and
    16-byte alignment (all Triton reads of a pointer), everything else by value; None for an
    argument of another type. The model's layers make the same launches but for their weights'
    addresses. Triton's own key costs 0.2-0.3 ms a launch in compile-only mode (it parses and
    hashes the compile options each time): 0.35-0.5 s of Llama-3.1-8B's 2,230 launches in the
    pass. Launches with equal keys are handed to Triton once."""
    try:
        positional = tuple(_argument_key(value) for value in args)
        named = tuple((name, _argument_key(value)) for name, value in sorted(kwargs.items()))
    except _NoKey:
        return None
    return (kernel, positional, named)


def _argument_key(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.data_ptr() % 16 == 0)
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_argument_key(item) for item in value))
    raise _NoKey(type(value).__name__)


def _load(kernel: object, device: int) -> None:
    torch.cuda.set_device(device)
    init_handles = getattr(kernel, "_init_handles", None)
    if init_handles is None:
        return
    try:
        init_handles()
    except Exception:  # out of resources: the real launch raises it with its context
        pass


def hash_triton_in_background() -> threading.Thread:
    """Triton keys its cache by a hash of its own files, libtriton's shared library among them,
    computed at a process's first compile: 0.4 s of the compile pass (profiled on an H200
    machine), with the GIL free while it hashes. Started at device set-up, it runs while the
    ranks join and the weights load; join the thread before the pass."""
    from triton.runtime.cache import triton_key

    thread = threading.Thread(target=triton_key, name="pagedllm-triton-key", daemon=True)
    thread.start()
    return thread


@torch.inference_mode()
def precompile_kernels(runner: ModelRunner, decode_batch_sizes: tuple[int, ...], max_workers: int) -> None:
    """Compiles, in parallel, the kernels of the profile forward, the dummy steps' prefill and
    mixed steps, and decode steps of `decode_batch_sizes` rows (the CUDA graph sizes), with
    their logits and greedy argmax."""
    model = runner.model
    assert model is not None and not runner.kv_caches, "after load_model(), before the KV cache"
    start = time.perf_counter()
    config = runner.config
    with triton_compile_only(max_workers) as stats:
        profile_inputs = build_profile_inputs(
            config.scheduler_config.max_num_batched_tokens, runner.model_config.max_model_len, runner.device
        )
        with set_forward_context(profile_inputs.attn_metadata):
            model(profile_inputs.input_ids, profile_inputs.positions)
        with _temporary_kv_cache(runner, num_blocks=3):
            for query_lens in _PREFILL_QUERY_LENS:
                _forward(runner, query_lens)
            for batch_size in _distinct_decode_sizes(decode_batch_sizes):
                hidden_states = _forward(runner, (1,) * batch_size)
                if batch_size <= _FEW_ROWS:
                    logits = model.compute_logits(hidden_states)
                    # Greedy rows read model-dtype logits, or float32 ones once anything edits them.
                    runner.sampler._argmax(logits)
                    runner.sampler._argmax(logits.float())
        submitted = time.perf_counter()
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    end = time.perf_counter()
    logger.info(
        "Prepared %d Triton kernel variants (compiled, or read from the Triton cache) on %d threads in %.1f s "
        "(forwards %.2f s, then waiting for compiles %.2f s).",
        stats["variants"], max_workers, end - start, submitted - start, end - submitted,
    )


def _distinct_decode_sizes(batch_sizes: tuple[int, ...]) -> list[int]:
    """The batch sizes whose launches can differ: every size up to _FEW_ROWS (the GEMV and
    argmax paths), and beyond it the first size of each class of Triton's int specialization
    (a multiple of 16 or not: the int4 GEMM's row count) and the largest. The other kernels
    leave batch-dependent ints unspecialized, so the sizes in between add no variant."""
    sizes = sorted(set(batch_sizes))
    larger = [size for size in sizes if size > _FEW_ROWS]
    chosen = {size for size in sizes if size <= _FEW_ROWS} | set(larger[-1:])
    for multiple_of_16 in (True, False):
        chosen |= set([size for size in larger if (size % 16 == 0) == multiple_of_16][:1])
    return sorted(chosen)


def _forward(runner: ModelRunner, query_lens: tuple[int, ...]) -> torch.Tensor:
    """A step of requests with these query lengths over KV block 0: a query length of 1 is a
    decode row, more a prefill chunk. (The attention kernels do not specialize on the block
    table's width, so one block per request stands for any.)"""
    inputs = build_dummy_inputs(list(query_lens), block_table_width=1, device=runner.device)
    with set_forward_context(inputs.attn_metadata):
        return runner.model(inputs.input_ids, inputs.positions)


@contextlib.contextmanager
def _temporary_kv_cache(runner: ModelRunner, num_blocks: int) -> Iterator[None]:
    """Binds a KV cache of a few blocks to the attention layers (the kernels' specializations
    do not depend on its size), and unbinds it after, so the profile runs as without it."""
    runner.initialize_kv_cache(num_blocks)
    try:
        yield
    finally:
        for layer in runner.attention_layers:
            layer.kv_cache = None
        runner.kv_caches = []
