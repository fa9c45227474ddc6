"""How the engine turns a memory budget into KV cache blocks: one policy, used by the worker's
profiler (with measured figures) and by `pagedllm plan` (with estimated ones), so the two
agree by construction. Plain arithmetic over byte counts; nothing here touches a device.

    kv budget = own budget - weights - peak activations - non-torch memory - CUDA graphs
      own budget = total * gpu_memory_utilization (on CPU: PAGEDLLM_CPU_KVCACHE_SPACE), or
                   kv_cache_memory_bytes given directly
    blocks    = min(kv budget // block bytes, usable blocks * (1 + kv_cache_headroom))
      usable blocks = max_num_seqs requests of max_model_len tokens, each rounded up to blocks
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Measured on an H100 with the fused kernels: 35 graphs of a 28-layer model took 0.03 GiB
# beyond their activations; a fixed part (library workspaces) plus a little per graph and
# layer (split-K scratch, graph bookkeeping) covers it with room to spare.
CUDA_GRAPH_FIXED_BYTES = 64 << 20
CUDA_GRAPH_BYTES_PER_LAYER = 16 << 10


def format_gib(num_bytes: int | float) -> str:
    return f"{num_bytes / (1 << 30):.2f} GiB"


def cuda_graph_bytes(
    peak_activation_bytes: int,
    max_num_batched_tokens: int,
    capture_sizes: tuple[int, ...],
    num_layers: int,
) -> int:
    """Graphs share one pool sized by the largest captured batch's activations, which scale
    with tokens like the profiled peak; plus a fixed cost per graph and layer."""
    if not capture_sizes:
        return 0
    activations = peak_activation_bytes * max(capture_sizes) // max_num_batched_tokens
    return activations + CUDA_GRAPH_FIXED_BYTES + CUDA_GRAPH_BYTES_PER_LAYER * num_layers * len(capture_sizes)


def blocks_per_request(max_model_len: int, block_size: int) -> int:
    return math.ceil(max_model_len / block_size)


def usable_kv_blocks(max_num_seqs: int, max_model_len: int, block_size: int, headroom: float) -> int:
    """The most blocks the scheduler can ever use (max_num_seqs requests of max_model_len
    tokens) plus `headroom` of that for prefix-cache reuse: a larger cache is never used."""
    needed = max_num_seqs * blocks_per_request(max_model_len, block_size)
    return needed + math.ceil(needed * headroom)


@dataclass(frozen=True)
class KVCacheSizing:
    """Where the KV cache's size comes from, in blocks and bytes."""

    budget_bytes: int
    """Bytes the budget leaves for the KV cache."""
    block_bytes: int
    """Bytes of one block summed over the rank's attention layers."""
    block_size: int
    budget_blocks: int
    """Blocks the budget holds."""
    usable_blocks: int
    """Blocks max_num_seqs x max_model_len (plus headroom) can use."""
    num_blocks: int
    """Blocks allocated: the smaller of the two."""

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def unused_budget_bytes(self) -> int:
        """Budget left free because the cache was capped at what can be used."""
        return max(0, self.budget_bytes - self.kv_cache_bytes)

    def max_concurrency(self, max_model_len: int) -> float:
        return self.num_blocks / blocks_per_request(max_model_len, self.block_size)


def size_kv_cache(
    budget_bytes: int,
    block_bytes: int,
    block_size: int,
    max_num_seqs: int,
    max_model_len: int,
    headroom: float,
) -> KVCacheSizing:
    budget_blocks = max(0, budget_bytes) // block_bytes
    usable = usable_kv_blocks(max_num_seqs, max_model_len, block_size, headroom)
    return KVCacheSizing(
        budget_bytes=max(0, budget_bytes),
        block_bytes=block_bytes,
        block_size=block_size,
        budget_blocks=budget_blocks,
        usable_blocks=usable,
        num_blocks=min(budget_blocks, usable),
    )


def largest_max_model_len(num_blocks: int, block_size: int, model_max_len: int) -> int:
    """The longest request (up to the model's length) that fits `num_blocks` on its own."""
    return min(model_max_len, num_blocks * block_size)


def does_not_fit_message(sizing: KVCacheSizing, max_model_len: int, fixes: str) -> str | None:
    """Why one request of max_model_len tokens cannot run, or None when it can."""
    tokens = sizing.num_tokens
    if tokens >= max_model_len:
        return None
    return (
        f"The KV cache holds {tokens:,} tokens ({format_gib(sizing.kv_cache_bytes)}, "
        f"{sizing.num_blocks} blocks of {sizing.block_size}) but max_model_len is {max_model_len:,}: one "
        f"request of max_model_len tokens would not fit. Lower max_model_len to at most "
        f"{tokens:,} (or pass max_model_len='auto'), or {fixes}."
    )
