"""The Triton side of ops/epilogue.py: the tiles an epilogue needs (gate_up_columns,
rope_pair_columns), the rope factors, and the store that applies the epilogue."""

from __future__ import annotations

import triton
import triton.language as tl

from pagedllm.layers.ops.rotary import rotate_pair
from pagedllm.layers.ops.silu_and_mul import silu_mul


@triton.jit
def epilogue_columns(pid_n, BLOCK_N: tl.constexpr, N, offs_m, mask_m, positions_ptr, cos_ptr, sin_ptr, stride_cos,
                     rotated_columns, dtype: tl.constexpr, EPILOGUE: tl.constexpr, ROPE_HALF: tl.constexpr,
                     RUN: tl.constexpr):
    """The output columns tile pid_n reads, their mask, and the rope's cos and sin (never-read
    stand-ins without rope: a Triton function cannot return None), for the kernel's EPILOGUE:
    plain tiles, gate_up_columns, or rope_pair_columns with rope_factors. The one place a
    kernel's tile is chosen by its epilogue."""
    rope_cos = tl.zeros([1], dtype=tl.float32)
    rope_sin = tl.zeros([1], dtype=tl.float32)
    if EPILOGUE == 1:
        offs_n, mask_n = gate_up_columns(pid_n, BLOCK_N, N, RUN)
    elif EPILOGUE == 2:
        offs_n, mask_n, pairs = rope_pair_columns(pid_n, BLOCK_N, N, ROPE_HALF, RUN)
        rope_cos, rope_sin = rope_factors(positions_ptr, cos_ptr, sin_ptr, stride_cos, offs_m, mask_m, pairs,
                                          rotated_columns, ROPE_HALF, dtype)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
    return offs_n, mask_n, rope_cos, rope_sin


@triton.jit
def gate_up_columns(pid_n, BLOCK_N: tl.constexpr, N, RUN: tl.constexpr):
    """For a weight stacking a gate and an up matrix of N / 2 outputs each: the output indices
    tile pid_n reads (its first BLOCK_N / 2 are gate outputs, the rest the same up outputs),
    and their mask. RUN (ops/epilogue.py's contiguous_run): the indices come in aligned
    runs of RUN consecutive ones, which keeps loads along N vectorized."""
    HALF_N: tl.constexpr = BLOCK_N // 2
    tile_cols = tl.arange(0, BLOCK_N)
    out_cols = pid_n * HALF_N + tile_cols % HALF_N
    columns = tl.where(tile_cols < HALF_N, out_cols, N // 2 + out_cols)
    return tl.max_contiguous(tl.multiple_of(columns, RUN), RUN), out_cols < N // 2


@triton.jit
def rope_pair_columns(pid_n, BLOCK_N: tl.constexpr, N, ROPE_HALF: tl.constexpr, RUN: tl.constexpr):
    """For outputs that are heads of 2 * ROPE_HALF features: the output indices tile pid_n
    reads (its first BLOCK_N / 2 are first-half features i of their heads, the rest features
    i + ROPE_HALF of the same heads), their mask, and the first halves' pair numbers
    [BLOCK_N / 2]. RUN: as gate_up_columns'."""
    PAIRS: tl.constexpr = BLOCK_N // 2
    tile_cols = tl.arange(0, BLOCK_N)
    pair = pid_n * PAIRS + tile_cols % PAIRS
    first = (pair // ROPE_HALF) * (2 * ROPE_HALF) + pair % ROPE_HALF
    columns = tl.where(tile_cols < PAIRS, first, first + ROPE_HALF)
    return (tl.max_contiguous(tl.multiple_of(columns, RUN), RUN), pair < N // 2,
            pid_n * PAIRS + tl.arange(0, PAIRS))


@triton.jit
def rope_factors(positions_ptr, cos_ptr, sin_ptr, stride_cos, offs_m, mask_m, pairs, rotated_columns,
                 ROPE_HALF: tl.constexpr, dtype: tl.constexpr):
    """cos and sin [BLOCK_M, BLOCK_N / 2] for rope_pair_columns' pairs at each row's position,
    rounded to `dtype` as the reference rope rounds them; 1 and 0 (no rotation) for pairs of
    the columns past rotated_columns. Loaded when the program starts, so the epilogue never
    waits for them."""
    frequency = pairs % ROPE_HALF
    rotated = (pairs // ROPE_HALF) * (2 * ROPE_HALF) < rotated_columns
    position = tl.load(positions_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    rows = position[:, None] * stride_cos + frequency[None, :]
    mask = mask_m[:, None] & rotated[None, :]
    cos = tl.load(cos_ptr + rows, mask=mask, other=1.0).to(tl.float32).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + rows, mask=mask, other=0.0).to(tl.float32).to(dtype).to(tl.float32)
    return cos, sin


@triton.jit
def store_tile(values, out_ptr, offs_m, offs_n, mask_m, mask_n, N, stride_om, tile_id, EPILOGUE: tl.constexpr,
               rope_cos, rope_sin):
    """values [BLOCK_M, BLOCK_N] float32 sums into out [M, N] (out's dtype); with an epilogue
    they are rounded to that dtype first, as the unfused kernel would read them, and:
    SILU_AND_MUL (a gate_up_columns tile): silu(gate) * up into out [M, N / 2];
    ROPE (a rope_pair_columns tile; rope_factors' cos and sin): each pair rotated."""
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    HALF_N: tl.constexpr = values.shape[1] // 2
    if EPILOGUE == 0:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], values.to(dtype),
                 mask=mask_m[:, None] & mask_n[None, :])
    else:
        halves = tl.permute(tl.reshape(values.to(dtype).to(tl.float32), [values.shape[0], 2, HALF_N]), (0, 2, 1))
        first, second = tl.split(halves)
        if EPILOGUE == 1:
            cols = tile_id * HALF_N + tl.arange(0, HALF_N)
            tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :], silu_mul(first, second, dtype),
                     mask=mask_m[:, None] & (cols[None, :] < N // 2))
        else:
            first, second = rotate_pair(first, second, rope_cos, rope_sin, dtype)
            rotated = tl.reshape(tl.permute(tl.join(first, second), (0, 2, 1)), [values.shape[0], values.shape[1]])
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], rotated,
                     mask=mask_m[:, None] & mask_n[None, :])
