"""Prefill-sized matmuls of group-quantized integer weights: the internal layout
(kernels/int_group.py) dequantized into a 16-bit [K, N] scratch weight by one Triton kernel,
then one dense `torch.matmul` (cuBLAS).

From a few hundred rows a weight-only matmul is no longer bound by the weight's bytes but by
its arithmetic, and cuBLAS's tensor-core GEMM does that arithmetic several times faster than
the Triton kernels that unpack inside their tiles (`benchmarks/int4_gemm.py --prefill`,
BENCHMARKS.md). Writing the dequantized weight costs one pass over N * K 16-bit values, about
the time of a bf16 GEMV of the layer: small beside a long prefill's GEMM, which then runs at
nearly bf16 speed. vLLM's exllama kernels make the same trade for large batches.

The scratch weight comes from torch's caching allocator, so the memory profile's largest
prefill counts it (the largest fused layer, e.g. Llama-3.1-8B's gate_up: 235 MB in bf16).
Batches captured in CUDA graphs keep the in-tile kernels: a captured scratch weight would be
held in the graphs' memory pool, which the memory plan sizes by activations alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.layers.quantization.kernels.int_group import kernel_group_size

# Rows from which `triton_int_group_matmul` dequantizes and calls cuBLAS instead of its
# in-tile kernels. H200, Llama-3.1-8B's four shapes summed (benchmarks/int4_gemm.py --prefill,
# BENCHMARKS.md): at 128 rows the tiles take 280 us and this path 331 us; at 256, 484 against 329.
DEQUANT_MIN_ROWS = 256


@triton.jit
def row_shift(row, BITS: tl.constexpr):
    """The bit offset of row `row` of a word of the internal layout (kernels/int_group.py:
    4-bit words interleaved, rows 2s and 2s + 1 at bits 4s and 16 + 4s)."""
    if BITS == 4:
        return (row // 2) * 4 + (row % 2) * 16
    else:
        return row * BITS


@triton.jit
def _dequantize_kernel(
    qweight_ptr, scales_ptr, zeros_ptr, row_group_ptr, out_ptr, K, N, group_size,
    stride_qk, stride_sg, stride_zg, stride_ok,
    BITS: tl.constexpr, HAS_ROW_GROUP: tl.constexpr, TILE_IN_GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[k, n] = (q[k, n] - zeros[g(k), n]) * scales[g(k), n] in out's dtype.

    Layout: qweight int32 [K / pack, N], scales / zeros [G, N], row_group int32 [K] (act order;
    else g(k) = k // group_size, group_size > K for one group), out [K, N]; last dims
    contiguous. TILE_IN_GROUP: every BLOCK_K-row tile lies in one group (one row of scales).
    Grid: (cdiv(K, BLOCK_K), cdiv(N, BLOCK_N)). Bytes: K * N * (bits / 8 + 2).
    """
    PACK: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PACK
    MASK: tl.constexpr = (1 << BITS) - 1
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_k < K)[:, None] & mask_n[None, :]
    # Each word is loaded once and spread over its PACK rows.
    word_rows = k0 // PACK + tl.arange(0, WORDS)
    words = tl.load(qweight_ptr + word_rows[:, None] * stride_qk + offs_n[None, :],
                    mask=(word_rows < K // PACK)[:, None] & mask_n[None, :], other=0)
    shifts = row_shift(tl.arange(0, PACK), BITS)
    q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & MASK, (BLOCK_K, BLOCK_N)).to(tl.float32)
    if TILE_IN_GROUP:
        group = k0 // group_size
        scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        zero = tl.load(zeros_ptr + group * stride_zg + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    else:
        if HAS_ROW_GROUP:
            groups = tl.load(row_group_ptr + offs_k, mask=offs_k < K, other=0)
        else:
            groups = offs_k // group_size
        scale = tl.load(scales_ptr + groups[:, None] * stride_sg + offs_n[None, :], mask=mask, other=0.0)
        zero = tl.load(zeros_ptr + groups[:, None] * stride_zg + offs_n[None, :], mask=mask, other=0.0)
        scale, zero = scale.to(tl.float32), zero.to(tl.float32)
    # (q - zero) is an exact small integer and its product with a 16-bit scale is exact in
    # float32, so the one rounding to out's dtype gives the reference's bits (int_group.dequantize).
    weight = (q - zero) * scale
    tl.store(out_ptr + offs_k[:, None] * stride_ok + offs_n[None, :], weight.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
               row_group: torch.Tensor | None = None) -> torch.Tensor:
    """The [K, N] weight of the internal layout in the scales' dtype, as
    `int_group.dequantize` computes it (the same values), in one launch."""
    k = qweight.shape[0] * (32 // bits)
    n = qweight.shape[1]
    for name, tensor in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"dequantize needs {name} with contiguous rows; got strides {tensor.stride()}.")
    out = torch.empty((k, n), device=qweight.device, dtype=scales.dtype)
    block_k, block_n = 64, 128
    tile_group_size = kernel_group_size(group_size, k, block_k)
    _dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        qweight, scales, zeros, row_group if row_group is not None else qweight, out, k, n,
        tile_group_size, qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        BITS=bits, HAS_ROW_GROUP=row_group is not None,
        TILE_IN_GROUP=row_group is None and tile_group_size % block_k == 0,
        BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4,
    )
    return out


def dequantize_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      bits: int, group_size: int, row_group: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W` for x [M, K] in the scales' dtype (rows already permuted for act order)."""
    return torch.matmul(x, dequantize(qweight, scales, zeros, bits, group_size, row_group))
