"""Measures this rank's memory and sizes its KV cache with the policy of memory_policy.py
(the one `pagedllm plan` estimates with); every figure is logged in GiB.

`gpu_memory_utilization` is this engine's own budget, `total * gpu_memory_utilization`: only
memory this process takes counts against it (torch's allocations and the growth of non-torch
memory since the worker started), so engines with budgets that add up to less than the GPU
share it, and a budget larger than the memory free at start fails at once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from pagedllm.config import EngineConfig
from pagedllm.worker import memory_policy
from pagedllm.worker.memory_policy import KVCacheSizing, format_gib

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryBaseline:
    """The device when the worker started, before the model: what others already use."""

    free_bytes: int
    total_bytes: int
    torch_reserved_bytes: int


def take_memory_baseline(engine_config: EngineConfig, device: torch.device) -> MemoryBaseline:
    """Snapshot at start-up; fails when this engine's budget exceeds the free memory."""
    free, total = torch.cuda.mem_get_info(device)
    baseline = MemoryBaseline(free, total, torch.cuda.memory_reserved(device))
    cache_config = engine_config.cache_config
    budget = int(total * cache_config.gpu_memory_utilization)
    if cache_config.kv_cache_memory_bytes is None and budget > free:
        raise ValueError(
            f"gpu_memory_utilization={cache_config.gpu_memory_utilization} asks for "
            f"{format_gib(budget)} of {device} ({format_gib(total)} in all), but only "
            f"{format_gib(free)} is free ({format_gib(total - free)} is used by other processes); "
            f"use gpu_memory_utilization <= {max(free / total - 0.01, 0.0):.2f}, or free the GPU."
        )
    return baseline


@dataclass(frozen=True)
class MemoryProfile:
    budget_bytes: int
    """total * gpu_memory_utilization: this engine's own share of the GPU."""
    weights_bytes: int
    peak_activation_bytes: int
    non_torch_bytes: int
    """Device memory this process took outside torch's allocator since it started (NCCL
    buffers, library workspaces)."""

    @property
    def kv_budget_bytes(self) -> int:
        """What is left for the KV cache and the CUDA graphs."""
        return self.budget_bytes - self.weights_bytes - self.peak_activation_bytes - self.non_torch_bytes


def profile_cuda_memory(
    engine_config: EngineConfig,
    device: torch.device,
    baseline: MemoryBaseline,
    weights_bytes: int,
    run_profile: Callable[[], None],
) -> MemoryProfile:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    allocated_before = torch.cuda.memory_allocated(device)
    run_profile()
    torch.cuda.synchronize(device)
    peak_activation = torch.cuda.max_memory_allocated(device) - allocated_before
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    used_since_start = baseline.free_bytes - free
    torch_since_start = torch.cuda.memory_reserved(device) - baseline.torch_reserved_bytes
    return MemoryProfile(
        budget_bytes=int(baseline.total_bytes * engine_config.cache_config.gpu_memory_utilization),
        weights_bytes=weights_bytes,
        peak_activation_bytes=peak_activation,
        non_torch_bytes=max(0, used_since_start - torch_since_start),
    )


def estimate_cuda_graph_bytes(engine_config: EngineConfig, peak_activation_bytes: int) -> int:
    compilation_config = engine_config.compilation_config
    if not compilation_config.use_cudagraph:
        return 0
    return memory_policy.cuda_graph_bytes(
        peak_activation_bytes,
        engine_config.scheduler_config.max_num_batched_tokens,
        compilation_config.cudagraph_capture_sizes,
        engine_config.model_config.num_hidden_layers,
    )


def size_kv_cache(engine_config: EngineConfig, budget_bytes: int, block_bytes: int) -> KVCacheSizing:
    """Blocks for this budget, capped at what max_num_seqs x max_model_len can use."""
    cache_config, scheduler_config = engine_config.cache_config, engine_config.scheduler_config
    return memory_policy.size_kv_cache(
        budget_bytes, block_bytes, cache_config.block_size, scheduler_config.max_num_seqs,
        engine_config.model_config.max_model_len, cache_config.kv_cache_headroom,
    )


def cpu_kv_budget_bytes(engine_config: EngineConfig) -> int:
    override = engine_config.cache_config.kv_cache_memory_bytes
    return override if override is not None else engine_config.cache_config.cpu_kv_cache_bytes


def log_cuda_budget(engine_config: EngineConfig, profile: MemoryProfile, graph_bytes: int) -> None:
    override = engine_config.cache_config.kv_cache_memory_bytes
    logger.info(
        "Memory: budget %s (gpu_memory_utilization=%.2f), weights %s, peak activations %s, "
        "non-torch %s, CUDA graphs %s, KV cache budget %s%s.",
        format_gib(profile.budget_bytes), engine_config.cache_config.gpu_memory_utilization,
        format_gib(profile.weights_bytes), format_gib(profile.peak_activation_bytes),
        format_gib(profile.non_torch_bytes), format_gib(graph_bytes),
        format_gib(override if override is not None else max(profile.kv_budget_bytes - graph_bytes, 0)),
        " (kv_cache_memory_bytes)" if override is not None else "",
    )


def log_cpu_budget(engine_config: EngineConfig, weights_bytes: int) -> None:
    override = engine_config.cache_config.kv_cache_memory_bytes
    logger.info(
        "Memory on CPU: weights %s, KV cache budget %s (%s).",
        format_gib(weights_bytes), format_gib(cpu_kv_budget_bytes(engine_config)),
        "kv_cache_memory_bytes" if override is not None else "PAGEDLLM_CPU_KVCACHE_SPACE",
    )


def _fp8_cache_hint(engine_config: EngineConfig, sizing: KVCacheSizing) -> str:
    """", or pass kv_cache_dtype='fp8' ..." when the cache holds the model dtype and one byte a
    value would make max_model_len fit in the same budget; else ""."""
    itemsize = engine_config.model_config.dtype.itemsize
    if engine_config.cache_config.cache_dtype != "auto" or itemsize == 1:
        return ""
    fp8_tokens = size_kv_cache(engine_config, sizing.budget_bytes, sizing.block_bytes // itemsize).num_tokens
    if fp8_tokens < engine_config.model_config.max_model_len:
        return ""
    return f", or pass kv_cache_dtype='fp8' (one byte a value instead of {itemsize}: {fp8_tokens:,} tokens)"


def check_and_log_kv_cache(engine_config: EngineConfig, sizing: KVCacheSizing, device: torch.device) -> int:
    """The number of blocks; fails when one request of max_model_len tokens does not fit
    (unless max_model_len='auto', which the engine then lowers to what fits).
    num_gpu_blocks_override replaces the blocks the budget gives, as in vLLM."""
    blocks_override = engine_config.cache_config.num_gpu_blocks_override
    if blocks_override is not None:
        logger.info("KV cache: num_gpu_blocks_override=%d replaces the %d blocks the budget gives.",
                    blocks_override, sizing.num_blocks)
        sizing = replace(sizing, num_blocks=blocks_override)
    max_model_len = engine_config.model_config.max_model_len
    override = engine_config.cache_config.kv_cache_memory_bytes
    if override is not None:
        # The option decides the budget alone: the device's settings would change nothing.
        needed = -(-max_model_len // sizing.block_size) * sizing.block_bytes
        fixes = f"raise kv_cache_memory_bytes (now {override:,}) to at least {needed:,} ({format_gib(needed)})"
    elif device.type == "cuda":
        fixes = ("raise gpu_memory_utilization (now "
                 f"{engine_config.cache_config.gpu_memory_utilization}) or kv_cache_memory_bytes")
    else:
        fixes = "raise PAGEDLLM_CPU_KVCACHE_SPACE (GiB) or pass kv_cache_memory_bytes"
    fixes += _fp8_cache_hint(engine_config, sizing)
    if engine_config.model_config.max_model_len_auto:
        if sizing.num_blocks == 0:
            raise ValueError(f"The KV cache budget ({format_gib(sizing.budget_bytes)}) holds no block; {fixes}.")
    else:
        message = memory_policy.does_not_fit_message(sizing, max_model_len, fixes)
        if message is not None:
            raise ValueError(message)
    capped = sizing.num_blocks < sizing.budget_blocks
    logger.info(
        "KV cache: %d blocks of %d tokens (%s per block), %s tokens, %s; maximum concurrency at "
        "max_model_len %d: %.2fx.%s",
        sizing.num_blocks, sizing.block_size, f"{sizing.block_bytes / 1024:.1f} KiB",
        f"{sizing.num_tokens:,}", format_gib(sizing.kv_cache_bytes), max_model_len,
        sizing.max_concurrency(max_model_len),
        f" Capped at max_num_seqs x max_model_len plus {engine_config.cache_config.kv_cache_headroom:.0%} "
        f"headroom: {format_gib(sizing.unused_budget_bytes)} of the KV budget stays free." if capped else
        f" The whole KV budget is used ({format_gib(sizing.unused_budget_bytes)} free).",
    )
    return sizing.num_blocks
