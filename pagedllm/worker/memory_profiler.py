"""Sizes the KV cache: every byte count of start-up is computed here and logged in GiB."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagedllm.config import EngineConfig

logger = logging.getLogger(__name__)


def format_gib(num_bytes: int | float) -> str:
    return f"{num_bytes / (1 << 30):.2f} GiB"


@dataclass(frozen=True)
class MemoryProfile:
    weights_bytes: int
    peak_activation_bytes: int
    non_torch_bytes: int
    kv_cache_bytes: int
    """What is left for the KV cache."""


def profile_cuda_memory(
    engine_config: EngineConfig, device: torch.device, weights_bytes: int, run_profile: Callable[[], None]
) -> MemoryProfile:
    """kv = total * gpu_memory_utilization - weights - peak activations - non-torch memory
    (CUDA context, NCCL buffers: what the driver reports used beyond torch's reservations)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    allocated_before = torch.cuda.memory_allocated(device)
    run_profile()
    torch.cuda.synchronize(device)
    peak_activation = torch.cuda.max_memory_allocated(device) - allocated_before
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max(0, (total - free) - torch.cuda.memory_reserved(device))
    torch.cuda.empty_cache()
    budget = int(total * engine_config.cache_config.gpu_memory_utilization)
    kv_bytes = budget - weights_bytes - peak_activation - non_torch
    override = engine_config.cache_config.kv_cache_memory_bytes
    profile = MemoryProfile(
        weights_bytes=weights_bytes,
        peak_activation_bytes=peak_activation,
        non_torch_bytes=non_torch,
        kv_cache_bytes=override if override is not None else max(kv_bytes, 0),
    )
    logger.info(
        "Memory: total %s, budget %s (gpu_memory_utilization=%.2f), weights %s, peak activations "
        "%s, non-torch %s, KV cache %s%s.",
        format_gib(total), format_gib(budget), engine_config.cache_config.gpu_memory_utilization,
        format_gib(weights_bytes), format_gib(peak_activation), format_gib(non_torch),
        format_gib(profile.kv_cache_bytes), " (kv_cache_memory_bytes)" if override is not None else "",
    )
    return profile


# Measured on an H100 with the fused kernels: 35 graphs of a 28-layer model took 0.03 GiB
# beyond their activations; a fixed part (library workspaces) plus a little per graph and
# layer (split-K scratch, graph bookkeeping) covers it with room to spare.
_CUDA_GRAPH_FIXED_BYTES = 64 << 20
_CUDA_GRAPH_BYTES_PER_LAYER = 16 << 10


def estimate_cuda_graph_bytes(engine_config: EngineConfig, profile: MemoryProfile) -> int:
    """Graphs share one pool sized by the largest captured batch's activations, which scale
    with tokens like the profiled peak; plus a fixed cost per graph."""
    compilation_config = engine_config.compilation_config
    if not compilation_config.use_cudagraph:
        return 0
    max_tokens = engine_config.scheduler_config.max_num_batched_tokens
    activations = profile.peak_activation_bytes * compilation_config.max_cudagraph_capture_size // max_tokens
    num_layers = engine_config.model_config.num_hidden_layers
    num_graphs = len(compilation_config.cudagraph_capture_sizes)
    return activations + _CUDA_GRAPH_FIXED_BYTES + _CUDA_GRAPH_BYTES_PER_LAYER * num_layers * num_graphs


def cpu_kv_cache_bytes(engine_config: EngineConfig) -> int:
    override = engine_config.cache_config.kv_cache_memory_bytes
    kv_bytes = override if override is not None else engine_config.cache_config.cpu_kv_cache_bytes
    logger.info(
        "KV cache on CPU: %s (%s).",
        format_gib(kv_bytes),
        "kv_cache_memory_bytes" if override is not None else "PAGEDLLM_CPU_KVCACHE_SPACE",
    )
    return kv_bytes


def num_kv_blocks_for(engine_config: EngineConfig, kv_cache_bytes: int, block_bytes: int, device: torch.device) -> int:
    """Blocks that fit the budget; fails when one request of max_model_len tokens does not."""
    block_size = engine_config.cache_config.block_size
    max_model_len = engine_config.model_config.max_model_len
    num_blocks = kv_cache_bytes // block_bytes
    tokens_available = num_blocks * block_size
    if tokens_available < max_model_len:
        if device.type == "cuda":
            fixes = ("raise gpu_memory_utilization (now "
                     f"{engine_config.cache_config.gpu_memory_utilization}) or kv_cache_memory_bytes")
        else:
            fixes = "raise PAGEDLLM_CPU_KVCACHE_SPACE (GiB) or kv_cache_memory_bytes"
        raise ValueError(
            f"The KV cache holds {tokens_available:,} tokens ({format_gib(kv_cache_bytes)}, "
            f"{num_blocks} blocks of {block_size}) but max_model_len is {max_model_len:,}: one "
            f"request of max_model_len tokens would not fit. Lower max_model_len to at most "
            f"{tokens_available:,}, or {fixes}."
        )
    logger.info(
        "KV cache: %d blocks of %d tokens (%s per block), %s tokens; maximum concurrency at "
        "max_model_len %d: %.2fx.",
        num_blocks, block_size, f"{block_bytes / 1024:.1f} KiB", f"{tokens_available:,}",
        max_model_len, tokens_available / max_model_len,
    )
    return num_blocks


def max_blocks_per_request(max_model_len: int, block_size: int) -> int:
    return math.ceil(max_model_len / block_size)
