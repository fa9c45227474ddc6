"""Writes a step's new keys and values into the paged KV cache (Triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One program copies at most this many elements of K (and as many of V): enough to hide
# latency, few enough that wide-head models (64 heads x 256) do not spill registers.
_MAX_ELEMENTS_PER_PROGRAM = 2048


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    num_kv_heads,
    head_size,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Scatter K/V rows of new tokens into their cache slots.

    Layout: key/value [num_tokens, num_kv_heads, head_size] (last dim contiguous, any token
    and head strides, so views of a fused qkv tensor work); k_cache/v_cache
    [num_blocks, PAGE_SIZE, num_kv_heads, head_size] (kv_cache[0] and kv_cache[1]);
    slot_mapping [num_tokens] int64, flat slot = block_id * PAGE_SIZE + offset, -1 = skip.
    Grid: (num_tokens, cdiv(num_kv_heads, BLOCK_H)); each program moves BLOCK_H heads of one
    token. Bytes: 2 reads + 2 writes of num_tokens * num_kv_heads * head_size elements; no FLOPs.
    """
    token = tl.program_id(0)
    head_block = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token)
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    # A padding token (slot -1) is masked rather than returned early so the kernel has a
    # single exit; its loads and stores are all predicated off.
    mask = (slot >= 0) & (heads[:, None] < num_kv_heads) & (dims[None, :] < head_size)
    slot = tl.maximum(slot, 0).to(tl.int64)
    block = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    cache_offsets = (
        block * stride_cache_block
        + offset * stride_cache_slot
        + heads[:, None] * stride_cache_head
        + dims[None, :]
    )
    token64 = token.to(tl.int64)
    k = tl.load(key_ptr + token64 * stride_key_token + heads[:, None] * stride_key_head + dims[None, :], mask=mask)
    v = tl.load(
        value_ptr + token64 * stride_value_token + heads[:, None] * stride_value_head + dims[None, :], mask=mask
    )
    if KV_FP8:
        # Stored as key / k_scale, saturated to e4m3's range (+-448).
        k = tl.clamp(k.to(tl.float32) / tl.load(k_scale_ptr), -448.0, 448.0)
        v = tl.clamp(v.to(tl.float32) / tl.load(v_scale_ptr), -448.0, 448.0)
    tl.store(k_cache_ptr + cache_offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_size] into kv_cache
    [2, num_blocks, block_size, num_kv_heads, head_size] at slot_mapping[:num_tokens]
    (int64, -1 skips the row). The grid depends only on num_tokens and the head count, so the
    call can be captured in a CUDA graph. A float8_e4m3fn cache stores key / k_scale and
    value / v_scale (scalar float32 tensors)."""
    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    kv_fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if kv_fp8 and (k_scale is None or v_scale is None):
        raise ValueError("An fp8 kv_cache needs k_scale and v_scale tensors.")
    block_d = triton.next_power_of_2(head_size)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, _MAX_ELEMENTS_PER_PROGRAM // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _reshape_and_cache_kernel[grid](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale if kv_fp8 else slot_mapping,
        v_scale if kv_fp8 else slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        num_kv_heads,
        head_size,
        PAGE_SIZE=k_cache.shape[1],
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        KV_FP8=kv_fp8,
        num_warps=4,
    )
