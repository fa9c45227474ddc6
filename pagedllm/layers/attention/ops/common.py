"""Shared choices of the attention kernels: tile shapes and dot precision."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG2_E = 1.0 / math.log(2.0)
"""Kernels use exp2; the softmax scale is multiplied by log2(e) once on the host."""


@dataclass(frozen=True, slots=True)
class TileConfig:
    block_m: int
    """Rows of a Q tile: (query token, head of the GQA group) pairs."""
    block_n: int
    """Keys per K/V tile."""
    num_warps: int
    num_stages: int


def tile_config(block_d: int, dtype: torch.dtype, queries_per_kv_p2: int) -> TileConfig:
    """Prefill tiles for a padded head dim: the fp32 accumulator (block_m x block_d) stays at
    <= 64 registers a thread and K/V tiles are multi-buffered in shared memory (228 KiB per
    SM on Hopper). For head_dim 128, 64x64 with 4 warps and 3 stages measured 355-369 TFLOP/s
    on an H100 (bf16, 8k causal and 2k-after-30k chunks, 16/8 heads) against 296-268 for
    128x64 with 8 warps; the other rows are untuned."""
    if block_d <= 64:
        config = TileConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    elif block_d <= 128:
        config = TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    else:
        config = TileConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
    block_m, block_n = config.block_m, config.block_n
    if dtype == torch.float32:
        # fp32 operands take twice the registers and shared memory (block_m 128 spilled).
        block_m, block_n = min(block_m, 64), block_n // 2
    # A tile must hold at least one query token's whole GQA group.
    block_m = max(block_m, queries_per_kv_p2)
    return TileConfig(block_m=block_m, block_n=block_n, num_warps=config.num_warps, num_stages=config.num_stages)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs would otherwise run through tf32 (about 1e-3 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"
