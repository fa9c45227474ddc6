"""Neox-style rotary embedding (rotate_half, as transformers' Llama) applied in place to q and
k in one Triton launch.

Numerics follow layers/rotary_embedding.py: cos/sin are rounded to the activations' dtype and
the casts mirror the torch ops' roundings, but the compiler still fuses one product with the
add into an FMA (one rounding fewer). Measured on an H100: about 20% of bf16/fp16 results
differ from torch's, each by at most the rounding of one product (|diff| <= 2 eps (|x1| +
|x2|)); the other 80% are bit-identical. Greedy tokens of the engine tests are unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.layers.ops.pdl import pdl_launch_options, start_after_previous_kernel

# Elements of one head half a program rotates at once (heads * rotary_dim / 2): 8 a thread.
_ELEMENTS_PER_PROGRAM = 1024


@triton.jit
def rotate_pair(x1, x2, cos, sin, dtype: tl.constexpr):
    """Neox rope of feature pairs (x1 from a head's first half, x2 its partner; float32 holding
    `dtype` values; cos/sin rounded to dtype): (x1 cos - x2 sin, x2 cos + x1 sin) in dtype,
    each product rounded to dtype first, as the torch reference's casts round them. Also the
    qkv GEMV's epilogue (ops/epilogue.py)."""
    out1 = (x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)
    out2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    return out1.to(dtype), out2.to(dtype)


@triton.jit
def _rotate_heads(
    row_ptr, first_head, num_heads, cos, sin,
    HEAD_SIZE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    dtype = row_ptr.dtype.element_ty
    heads = first_head + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF)
    first_half = row_ptr + heads[:, None] * HEAD_SIZE + dims[None, :]
    x1 = tl.load(first_half, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first_half + HALF, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin with the torch reference's casts (one product and the
    # add still become an FMA; see the module docstring).
    out1, out2 = rotate_pair(x1, x2, cos[None, :], sin[None, :], dtype)
    tl.store(first_half, out1, mask=mask)
    tl.store(first_half + HALF, out2, mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    stride_q_token,
    stride_k_token,
    stride_positions,
    stride_cache_position,
    num_q_heads,
    num_kv_heads,
    num_q_blocks,
    HEAD_SIZE: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Rotates features [0, 2 * HALF) of every head of token t of q and k by angle
    positions[t] * inv_freq; features past 2 * HALF (partial rotary) are left untouched.

    Layout: q [T, num_q_heads * HEAD_SIZE], k [T, num_kv_heads * HEAD_SIZE], last dim
    contiguous, any token stride (views of a fused qkv output work in place); cos/sin caches
    [max_position, HALF]. Grid: (T, num_q_blocks + kv blocks), each program BLOCK_H heads of
    one token. Bytes: 2 * T * (Hq + Hkv) * 2 * HALF * elem + T * 2 * HALF * 4 of cos/sin.
    """
    start_after_previous_kernel(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    position = tl.load(positions_ptr + token * stride_positions).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dtype = q_ptr.dtype.element_ty
    cache_row = position * stride_cache_position + dims
    cos = tl.load(cos_ptr + cache_row, mask=dims < HALF, other=0.0).to(tl.float32).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + cache_row, mask=dims < HALF, other=0.0).to(tl.float32).to(dtype).to(tl.float32)
    if head_block < num_q_blocks:
        _rotate_heads(q_ptr + token * stride_q_token, head_block * BLOCK_H, num_q_heads, cos, sin,
                      HEAD_SIZE, HALF, BLOCK_H, BLOCK_HALF)
    else:
        _rotate_heads(k_ptr + token * stride_k_token, (head_block - num_q_blocks) * BLOCK_H, num_kv_heads,
                      cos, sin, HEAD_SIZE, HALF, BLOCK_H, BLOCK_HALF)


def apply_rotary(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    head_size: int,
    rotary_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rope on query [T, Hq * head_size] and key [T, Hkv * head_size] in place; returns them.

    positions [T] (ints below max_position: they are not checked, to keep the call free of
    host syncs); cos_cache/sin_cache [max_position, rotary_dim // 2] (float32, or the
    activations' dtype). The first rotary_dim features of each head rotate, the rest stay."""
    num_tokens = positions.shape[0]
    if positions.dim() != 1 or query.shape[0] != num_tokens or key.shape[0] != num_tokens:
        raise ValueError(
            f"apply_rotary: positions must be [T] and query/key [T, heads * {head_size}]; got "
            f"{tuple(positions.shape)}, {tuple(query.shape)}, {tuple(key.shape)}."
        )
    if rotary_dim % 2 or not 0 < rotary_dim <= head_size:
        raise ValueError(f"apply_rotary: rotary_dim={rotary_dim} must be even and in (0, head_size={head_size}].")
    if cos_cache.shape != sin_cache.shape or cos_cache.shape[-1] != rotary_dim // 2 or cos_cache.stride(-1) != 1:
        raise ValueError(
            f"apply_rotary: cos/sin caches must be contiguous [max_position, {rotary_dim // 2}]; got "
            f"{tuple(cos_cache.shape)} and {tuple(sin_cache.shape)}."
        )
    if num_tokens == 0:
        return query, key
    # view (not reshape): the rotation is in place, a copy would drop it.
    q_rows, k_rows = query.view(num_tokens, -1), key.view(num_tokens, -1)
    if q_rows.stride(-1) != 1 or k_rows.stride(-1) != 1 or query.dtype != key.dtype:
        raise ValueError(
            "apply_rotary works in place and needs query and key of one dtype with a contiguous "
            f"last dim; got {query.dtype} strides {query.stride()} and {key.dtype} strides {key.stride()}."
        )
    if q_rows.shape[1] % head_size or k_rows.shape[1] % head_size:
        raise ValueError(
            f"apply_rotary: query/key widths {q_rows.shape[1]} and {k_rows.shape[1]} are not multiples "
            f"of head_size={head_size}."
        )
    num_q_heads, num_kv_heads = q_rows.shape[1] // head_size, k_rows.shape[1] // head_size
    half = rotary_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(_ELEMENTS_PER_PROGRAM // block_half, triton.next_power_of_2(max(num_q_heads, num_kv_heads))))
    num_q_blocks = triton.cdiv(num_q_heads, block_h)
    grid = (num_tokens, num_q_blocks + triton.cdiv(num_kv_heads, block_h))
    _rotary_kernel[grid](
        q_rows, k_rows, positions, cos_cache, sin_cache,
        q_rows.stride(0), k_rows.stride(0), positions.stride(0), cos_cache.stride(0),
        num_q_heads, num_kv_heads, num_q_blocks,
        HEAD_SIZE=head_size, HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4,
        **pdl_launch_options(query.device),
    )
    return query, key
