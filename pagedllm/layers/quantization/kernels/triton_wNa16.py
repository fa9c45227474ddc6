"""Triton weight-only GEMM over the internal int-group layout (kernels/int_group.py):
out = x @ W with W[k, n] = (q[k, n] - zeros[g(k), n]) * scales[g(k), n], dequantized inside
the kernel tile by tile, accumulated in float32.

Decode (M <= 16 rows) is memory-bound: the kernel reads each packed word once and splits K
across programs so that enough programs stream the weight to fill every SM. The partial sums
go to a float32 workspace and are added in split order (the same result every run): by the
last split of each tile in the one-row GEMV when the layer passes its count buffer
(ops/split_k.py), else by one small kernel. One row runs a GEMV kernel that skips the
tensor-core tile and keeps all its arithmetic elementwise on the packed tile as loaded, its
values made floats by a bit trick (`_plane`): it serves 8-bit weights, act order and float32
rows. 17 to DEQUANT_MIN_ROWS - 1 rows tile over M; from DEQUANT_MIN_ROWS on, the weight is
dequantized once and multiplied by cuBLAS (kernels/int_dequant.py). 4-bit weights with uniform
groups and 16-bit activations go to kernels/int4_half2.py (one row) and kernels/int4_dot.py
(2-16 rows).

Groups: each K tile lies inside one group (the tile size divides group_size), so a tile loads
one row of scales and zeros; act-order layers pass `row_group` and load per-row scales instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.layers.ops import INTERPRETED
from pagedllm.layers.ops.pdl import allow_next_kernel, pdl_launch_options, wait_for_previous_kernel
from pagedllm.layers.ops.split_k import (
    finish_splits,
    k_tile_range,
    split_for,
    split_outputs,
    store_or_merge,
)
from pagedllm.layers.quantization.kernels import int4_dot, int4_half2
from pagedllm.layers.quantization.kernels.int_dequant import DEQUANT_MIN_ROWS, dequantize_matmul
from pagedllm.layers.quantization.kernels.int_dequant import row_shift as _row_shift


@triton.jit
def _plane(words, words_high, SHIFT: tl.constexpr, BITS: tl.constexpr, INTERP: tl.constexpr):
    """The value at bit SHIFT of each packed word as the float32 2**23 + q * 2**pos, pos being
    its offset within its half-word (words_high = words >> 16 holds the upper half): OR-ing a
    field below bit 23 into the bits of 2**23 (0x4B000000) adds it exactly. One LOP3 per value
    ((word & field) | 2**23), written out: ptxas leaves a separate AND and OR when both
    constants are immediates, 1.9 instructions per value instead of one."""
    FIELD: tl.constexpr = ((1 << BITS) - 1) << (SHIFT % 16)
    if SHIFT < 16:
        source = words
    else:
        source = words_high
    if INTERP:
        bits = (source & FIELD) | 0x4B000000
    else:
        bits = tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
            [source, tl.full(source.shape, FIELD, tl.int32), tl.full(source.shape, 0x4B000000, tl.int32)],
            dtype=tl.int32, is_pure=True, pack=1)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _split_rows(x_tile, WORDS: tl.constexpr):
    """x [WORDS, 8] (each word's eight x, loaded as one vector) as the tuple of its columns,
    split in registers: one load per word instead of eight."""
    x_even, x_odd = tl.split(tl.reshape(x_tile, (WORDS, 4, 2)))
    x_04, x_26 = tl.split(tl.reshape(x_even, (WORDS, 2, 2)))
    x_15, x_37 = tl.split(tl.reshape(x_odd, (WORDS, 2, 2)))
    x0, x4 = tl.split(x_04)
    x2, x6 = tl.split(x_26)
    x1, x5 = tl.split(x_15)
    x3, x7 = tl.split(x_37)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _int_group_gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, row_group_ptr, out_ptr,
    M, N, K, group_size,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_os, stride_om, stride_on,
    BITS: tl.constexpr, HAS_ROW_GROUP: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_words = tl.arange(0, BLOCK_K // PACK)
    shifts = _row_shift(tl.arange(0, PACK), BITS)
    mask_m = offs_m < M
    mask_n = offs_n < N

    tile_start, tile_end = k_tile_range(K, BLOCK_K, SPLIT_K, pid_k)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(tile_start, tile_end):
        k0 = tile * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # Each packed word is read once, then spread over its PACK rows.
        word_rows = k0 // PACK + offs_words
        words = tl.load(qweight_ptr + word_rows[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                        mask=(word_rows[:, None] < K // PACK) & mask_n[None, :], other=0)
        q = (words[:, None, :] >> shifts[None, :, None]) & MASK
        q = tl.reshape(q, (BLOCK_K, BLOCK_N)).to(tl.float32)
        if HAS_ROW_GROUP:
            groups = tl.load(row_group_ptr + offs_k, mask=mask_k, other=0)
            scale = tl.load(scales_ptr + groups[:, None] * stride_sg + offs_n[None, :] * stride_sn,
                            mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + groups[:, None] * stride_zg + offs_n[None, :] * stride_zn,
                           mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            w = (q - zero) * scale
        else:
            group = k0 // group_size
            scale = tl.load(scales_ptr + group * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)
            zero = tl.load(zeros_ptr + group * stride_zg + offs_n * stride_zn, mask=mask_n, other=0.0)
            w = (q - zero.to(tl.float32)[None, :]) * scale.to(tl.float32)[None, :]
        if IEEE:
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))

    # With split K, out_ptr is a float32 workspace [SPLIT_K, M, N] (see _sum_splits_kernel).
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _int_group_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, row_group_ptr, out_ptr, workspace_ptr, count_ptr,
    N, K, group_size,
    stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    BITS: tl.constexpr, HAS_ROW_GROUP: tl.constexpr, SPLIT_K: tl.constexpr, SELF_MERGE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, INTERP: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One row (batch-1 decode). Every step is elementwise on the [words, N] tile as loaded:
    value i of each word is multiplied by its x and summed into a per-word accumulator, so
    nothing is reshaped or reduced across threads until the end. The tiles' loads are
    pipelined NUM_STAGES deep. It is bound by instruction issue (ncu, BENCHMARKS.md seventh
    run): 5.8 SASS instructions per 4-bit value at 64 columns, 24-44% of the bandwidth on
    Llama-3.1-8B's shapes (eighth run), hence int4_half2.py for 16-bit rows. out [N] contiguous;
    split K: workspace [SPLIT_K, N] float32 and count_ptr as in ops/split_k.py."""
    wait_for_previous_kernel(USE_PDL)
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    WORDS: tl.constexpr = BLOCK_K // PACK
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_words = tl.arange(0, WORDS)

    tile_start, tile_end = k_tile_range(K, BLOCK_K, SPLIT_K, pid_k)

    acc = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
    for tile in tl.range(tile_start, tile_end, num_stages=NUM_STAGES):
        word_rows = tile * WORDS + offs_words
        mask_w = word_rows < K // PACK
        tile_mask = mask_w[:, None] & mask_n[None, :]
        words = tl.load(qweight_ptr + word_rows[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                        mask=tile_mask, other=0)
        if HAS_ROW_GROUP:
            for i in tl.static_range(PACK):
                rows = word_rows * PACK + i
                x = tl.load(x_ptr + rows * stride_xk, mask=mask_w, other=0.0).to(tl.float32)
                groups = tl.load(row_group_ptr + rows, mask=mask_w, other=0)
                scale = tl.load(scales_ptr + groups[:, None] * stride_sg + offs_n[None, :] * stride_sn,
                                mask=tile_mask, other=0.0).to(tl.float32)
                zero = tl.load(zeros_ptr + groups[:, None] * stride_zg + offs_n[None, :] * stride_zn,
                               mask=tile_mask, other=0.0).to(tl.float32)
                q = ((words >> _row_shift(i, BITS)) & MASK).to(tl.float32)
                acc += x[:, None] * ((q - zero) * scale)
        else:
            # The tile lies inside one group: subtract its zero per value, scale once per tile.
            group = (tile * BLOCK_K) // group_size
            scale = tl.load(scales_ptr + group * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)
            zero = tl.load(zeros_ptr + group * stride_zg + offs_n * stride_zn, mask=mask_n, other=0.0)
            zero = zero.to(tl.float32)
            words_high = words >> 16
            tile_acc = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
            if PACK == 8:
                xs = _split_rows(tl.load(x_ptr + (word_rows[:, None] * PACK + tl.arange(0, PACK)[None, :]) * stride_xk,
                                         mask=mask_w[:, None], other=0.0).to(tl.float32), WORDS)
            for i in tl.static_range(PACK):
                # Value i as the float 2**23 + q * 2**pos with one bitwise op (see _plane), then
                # q - zero exactly with one FMA: (2**23 + q * 2**pos) / 2**pos - (2**23 / 2**pos
                # + zero). Row i's bit offset (_row_shift, spelled out so that it stays a constexpr).
                shift = i * BITS
                if BITS == 4:
                    shift = (i // 2) * 4 + (i % 2) * 16
                offset = 1 << (shift % 16)
                if PACK == 8:
                    x = xs[i]
                else:
                    x = tl.load(x_ptr + (word_rows * PACK + i) * stride_xk, mask=mask_w, other=0.0).to(tl.float32)
                q = _plane(words, words_high, shift, BITS, INTERP) * (1.0 / offset) - (zero + 8388608.0 / offset)[None, :]
                tile_acc += x[:, None] * q
            acc += tile_acc * scale.to(tl.float32)[None, :]

    allow_next_kernel(USE_PDL)
    result = tl.sum(acc, axis=0)[None, :]
    offs_m = tl.arange(0, 1)
    store_or_merge(result, out_ptr, workspace_ptr, count_ptr, offs_m, offs_n, offs_m < 1, mask_n, 1, N,
                   0, pid_n, pid_k, SPLIT_K, SELF_MERGE)


def _launch_config(m: int, n: int, k: int, tile_group: int, device: torch.device) -> dict[str, int]:
    """Tiles, split-K and warps for one shape. `tile_group`: the K tile must divide it."""
    # M <= 16 from the H200 sweep (`benchmarks/int4_gemm.py --sweep`, BENCHMARKS.md): three
    # stages, and 64-column GEMV tiles split about four programs per SM, were best or within
    # 3% of it on each Llama-3.1-8B shape.
    if m == 1:
        block_m, block_n, block_k, warps, stages = 1, 64, 128, 4, 3
    elif m <= 16:
        block_m, block_n, block_k, warps, stages = 16, 128 if n >= 128 else 64, 128, 4, 3
    elif m <= 64:
        block_m, block_n, block_k, warps, stages = 64, 128, 64, 4, 3
    else:
        # Eager batches from DEQUANT_MIN_ROWS on take the dequantized path; batches captured
        # in CUDA graphs (decode up to 512 rows) stay here. 128-row tiles were 3-4% faster than
        # 64-row ones over Llama-3.1-8B's shapes at 128 and 256 rows (int4_gemm.py --prefill).
        block_m, block_n, block_k, warps, stages = 128, 128, 64, 8, 3
    while tile_group % block_k:
        block_k //= 2
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    # Enough programs to keep every SM busy: about four small ones (decode) or two large ones
    # per SM; a long batch has that many output tiles already and does not split.
    split_k = split_for(tiles, triton.cdiv(k, block_k), 4 if m <= 64 else 2, device)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                num_warps=warps, num_stages=stages)


def triton_int_group_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bits: int, group_size: int, perm: torch.Tensor | None = None,
    row_group: torch.Tensor | None = None, config: dict[str, int] | None = None,
    split_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W` for a 2-D `x` [M, K] in the scales' dtype; same arguments as the reference.
    `config` overrides the launch heuristics (benchmarks/int4_gemm.py --sweep); `split_counts`
    is the layer's ops.split_k.split_count_buffer (one-row split-K launches then add their own
    splits)."""
    if perm is not None:
        x = x.index_select(-1, perm.long())
    x = x.to(scales.dtype)
    m, k = x.shape
    n = qweight.shape[1]
    pack = 32 // bits
    if k % pack or qweight.shape[0] != k // pack:
        raise ValueError(f"x has {k} input features but the weight packs {qweight.shape[0] * pack}.")
    if config is None and int4_half2.supports(m, k, bits, group_size, row_group is not None, x.dtype):
        return int4_half2.int4_half2_gemv(x, qweight, scales, zeros, group_size, split_counts)
    if config is None and int4_dot.supports(m, k, bits, group_size, row_group is not None, x.dtype):
        return int4_dot.int4_dot_matmul(x, qweight, scales, zeros, group_size, split_counts)
    # Not inside a CUDA graph: the captured scratch weight would stay in the graphs' memory
    # pool, which the memory plan sizes by the captured batches' activations alone.
    if config is None and m >= DEQUANT_MIN_ROWS and not _in_graph_capture(x):
        return dequantize_matmul(x, qweight, scales, zeros, bits, group_size, row_group)
    if row_group is None and group_size != -1 and group_size % 16:
        # Tiles of 16 rows cannot sit inside such groups: read each row's group instead.
        row_group = torch.arange(k, device=x.device, dtype=torch.int32) // group_size
    # One group (per-channel) or per-row groups: any K tile fits, so no limit on its size.
    uniform_groups = row_group is None and group_size != -1
    config = config or _launch_config(m, n, k, group_size if uniform_groups else 1 << 30, x.device)
    # The kernel's group of a tile is k0 // kernel_group_size: 0 for one group.
    kernel_group_size = group_size if uniform_groups else k + config["BLOCK_K"]
    split_k = config["SPLIT_K"]
    row_group_arg = row_group if row_group is not None else qweight
    if config["BLOCK_M"] == 1:
        return _gemv(x, qweight, scales, zeros, row_group, row_group_arg, bits, kernel_group_size, config,
                     split_counts)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    # No count buffer: this kernel's splits are always added by a second launch.
    splits = split_outputs(out, split_k, 0, None, placeholder=qweight)
    target = splits.workspace
    grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]), split_k)
    _int_group_gemm_kernel[grid](
        x, qweight, scales, zeros, row_group_arg, target,
        m, n, k, kernel_group_size,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
        target.stride(0) if split_k > 1 else 0, target.stride(-2), target.stride(-1),
        BITS=bits, HAS_ROW_GROUP=row_group is not None, IEEE=x.dtype == torch.float32, **config,
    )
    finish_splits(splits, out)
    return out


def _in_graph_capture(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _gemv(x, qweight, scales, zeros, row_group, row_group_arg, bits, kernel_group_size, config,
          split_counts) -> torch.Tensor:
    """Each row through the one-row kernel; split-K partial sums go to a float32 workspace,
    added by the last split (with `split_counts`) or by one more small kernel."""
    m, k = x.shape
    n = qweight.shape[1]
    split_k = config["SPLIT_K"]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    num_tiles = triton.cdiv(n, config["BLOCK_N"])
    gemv_config = {key: value for key, value in config.items() if key != "BLOCK_M"}
    for row in range(m):
        splits = split_outputs(out[row], split_k, num_tiles, split_counts, placeholder=qweight)
        _int_group_gemv_kernel[(num_tiles, split_k)](
            x[row], qweight, scales, zeros, row_group_arg, out[row], splits.workspace, splits.counts,
            n, k, kernel_group_size,
            x.stride(1), qweight.stride(0), qweight.stride(1),
            scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
            BITS=bits, HAS_ROW_GROUP=row_group is not None, SELF_MERGE=splits.self_merge,
            NUM_STAGES=config["num_stages"], INTERP=INTERPRETED, **gemv_config,
            **pdl_launch_options(x.device),
        )
        finish_splits(splits, out[row])
    return out
