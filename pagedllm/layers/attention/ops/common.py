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
    SM on Hopper). Measured on an H100, bf16, 16 q / 8 kv heads, 8k-token causal prefill
    (benchmarks/attention_micro.py --sweep-prefill): head_dim 64: 128x64, 4 warps, 3 stages,
    328 TFLOP/s (best of 4); 128: 64x64, 4 warps, 3 stages, 357 (373 for a 2k chunk after
    30k history) against 295 for 128x64 with 8 warps; 256: 64x32, 4 warps, 3 stages, 324
    against 146 with 8 warps and 2 stages."""
    if block_d <= 64:
        config = TileConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    elif block_d <= 128:
        config = TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    else:
        config = TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=3)
    block_m, block_n, num_warps, num_stages = config.block_m, config.block_n, config.num_warps, config.num_stages
    if dtype == torch.float32:
        # fp32 operands (IEEE dots) take twice the registers and shared memory: with 4 warps
        # every head_dim from 64 up spilled kilobytes (ptxas, sm_90); these shapes do not.
        block_m, block_n = (64, 32) if block_d <= 64 else (32, 16)
        num_warps, num_stages = 8, 2
    # A tile must hold at least one query token's whole GQA group.
    block_m = max(block_m, queries_per_kv_p2)
    return TileConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs would otherwise run through tf32 (about 1e-3 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"
