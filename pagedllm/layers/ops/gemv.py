"""Decode-sized matmuls (1-8 rows) as a split-K Triton kernel.

At M <= 8 rows a linear layer is a GEMV: it reads the whole [N, K] weight once and does almost
no arithmetic per byte, so its speed is the weight's bytes over the memory bandwidth. cuBLAS
picks tiles made for large M and, for some shapes (Llama-3.1-8B's qkv and o at batch 1),
launches too few blocks to keep every SM streaming. This kernel splits both N (BLOCK_N rows
of W per program) and K (SPLIT_K slices) so that there are several programs per SM whatever
the shape, and writes float32 partial sums that one small reduction adds in a fixed order
(deterministic, unlike atomics).

`should_use_gemv` is the dispatch rule UnquantizedLinearMethod.apply follows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_GEMV_ROWS = 8
# tl.dot needs at least 16 rows; the padding rows are masked loads of zeros, which cost no
# memory traffic, and the tensor cores have time to spare in a bandwidth-bound kernel.
_BLOCK_M = 16


@triton.jit
def _gemv_split_k_kernel(
    x_ptr, w_ptr, partial_ptr, M, N, K, stride_xm, stride_wn, stride_ps, stride_pm, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """partial[s, m, n] = sum over k in slice s of x[m, k] * w[n, k], in float32.

    Layout: x [M, K] and w [N, K] with contiguous last dims; partial [SPLIT_K, M, N] float32.
    Grid: (cdiv(N, BLOCK_N), SPLIT_K); k_per_split is a multiple of BLOCK_K.
    Bytes: N * K * elem (the weight, read once) + SPLIT_K * M * N * 4; FLOPs: 2 * M * N * K.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    out = partial_ptr + pid_k * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
    block_n: int = 64,
    block_k: int = 128,
) -> torch.Tensor:
    """x [..., K] @ weight[N, K].T (+ bias) for at most MAX_GEMV_ROWS rows, like F.linear.
    split_k=None picks enough K slices for about four programs per SM."""
    *lead, K = x.shape
    N = weight.shape[0]
    rows = x.reshape(-1, K)
    M = rows.shape[0]
    if M > MAX_GEMV_ROWS or weight.shape[1] != K:
        raise ValueError(f"gemv takes at most {MAX_GEMV_ROWS} rows of width {weight.shape[1]}; got {tuple(x.shape)}.")
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    num_k_blocks = triton.cdiv(K, block_k)
    if split_k is None:
        num_n_blocks = triton.cdiv(N, block_n)
        target_programs = 4 * _num_sms(x.device)
        split_k = max(1, min(num_k_blocks, target_programs // max(num_n_blocks, 1)))
    k_per_split = triton.cdiv(num_k_blocks, split_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    partial = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, block_n), split_k)
    _gemv_split_k_kernel[grid](
        rows, weight, partial, M, N, K, rows.stride(0), weight.stride(0), partial.stride(0), partial.stride(1),
        k_per_split, BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    out = partial[0] if split_k == 1 else partial.sum(dim=0)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*lead, N)


# Measured on an H200 (benchmarks/gemv_micro.py, BENCHMARKS.md): cuBLAS wins on every
# Llama-3.1-8B layer shape at 1-8 rows except vocabulary-sized outputs (the LM head), where
# the split-K kernel reads 2-3% faster; so only outputs this wide take the Triton path.
MIN_GEMV_OUTPUT_FEATURES = 65536


def should_use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ weight.T` runs as the Triton GEMV: half-precision CUDA inputs of 1-8 rows
    against a vocabulary-sized weight. A fixed rule, not a timing: two engines (or two ranks)
    must pick the same kernel for the same shape, or their roundings, and so near-tie greedy
    tokens, could differ."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (
        x.is_cuda and 0 < rows <= MAX_GEMV_ROWS and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype and weight.shape[0] >= MIN_GEMV_OUTPUT_FEATURES
    )


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter (tests on CPU): a few programs are enough
    return torch.cuda.get_device_properties(device).multi_processor_count
