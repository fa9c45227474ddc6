"""Triton weight-only GEMM over the internal int-group layout (kernels/int_group.py):
out = x @ W with W[k, n] = (q[k, n] - zeros[g(k), n]) * scales[g(k), n], dequantized inside
the kernel tile by tile, accumulated in float32.

Unpacking without conversions. A [words, N] tile of packed int32 is used plane by plane:
plane i is value i of every word, the input rows k = word * pack + i. Its values become
floats with one bitwise op each: OR-ing a field that sits at bit `pos` < 23 into the bits of
2**23 gives the float 2**23 + q * 2**pos exactly, and subtracting 2**23 + zero * 2**pos (once
per tile) leaves (q - zero) * 2**pos, the power of two being folded into x (the upper half of
each word is shifted down once). int -> float conversions run at a quarter of the FMA rate
on the GPU and bounded the previous kernel at 18-34% of bandwidth at batch 1. No reshapes
either: each plane meets its own x values ([M, words], a strided load), and a dot over
K = words is a dot like any other.

Two kernels, chosen per shape (`launch_config`):
  gemv  decode rows on the CUDA cores: each plane's values times x into a float32 tile, the
        group's scale applied once per tile. One row reads at the bandwidth limit only if the
        arithmetic per value stays at about three instructions.
  dot   tensor-core tiles: each plane is dequantized to x's dtype (the same rounding as the
        reference's dequantized weight) and fed to tl.dot.
Small weights split K over several programs so that every SM streams; the last split of a tile
adds the partial sums (ops/split_k.py).

Groups: a tile of K lies inside one group (the tile size divides group_size) and loads one row
of scales and zeros; act-order layers, and group sizes the tiles cannot sit in, pass
`row_group` and load each plane's own scales.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from pagedllm.layers.ops.split_k import (
    can_self_merge,
    k_tile_range,
    split_for,
    store_or_merge,
    sum_splits,
)

# float32 2**23 (bits 0x4B000000): OR-ing an integer field below bit 23 into it gives
# 2**23 + field exactly.
_MAGIC = tl.constexpr(8388608.0)


@triton.jit
def _plane(words, words_high, i: tl.constexpr, BITS: tl.constexpr):
    """Value i of each word as the float32 2**23 + q * 2**pos (exact)."""
    HALF: tl.constexpr = 16 // BITS
    FIELD: tl.constexpr = ((1 << BITS) - 1) << ((i % HALF) * BITS)
    if i < HALF:
        field = words & FIELD
    else:
        field = words_high & FIELD
    return (field | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _plane_scales(scales_ptr, zeros_ptr, row_group_ptr, group, rows, mask_rows, offs_n, mask_n,
                  stride_sg, stride_zg, HAS_ROW_GROUP: tl.constexpr):
    """(scale, zero) as float32: [1, N] for a tile inside one group, [rows, N] per row."""
    if HAS_ROW_GROUP:
        groups = tl.load(row_group_ptr + rows, mask=mask_rows, other=0)
        mask = mask_rows[:, None] & mask_n[None, :]
        scale = tl.load(scales_ptr + groups[:, None] * stride_sg + offs_n[None, :], mask=mask, other=0.0)
        zero = tl.load(zeros_ptr + groups[:, None] * stride_zg + offs_n[None, :], mask=mask, other=0.0)
    else:
        scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0)[None, :]
        zero = tl.load(zeros_ptr + group * stride_zg + offs_n, mask=mask_n, other=0.0)[None, :]
    return scale.to(tl.float32), zero.to(tl.float32)


@triton.jit(do_not_specialize=["M"])
def _int_group_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, row_group_ptr, out_ptr, workspace_ptr, count_ptr,
    M, N, K, group_size, stride_xm, stride_qk, stride_sg, stride_zg, stride_om,
    BITS: tl.constexpr, HAS_ROW_GROUP: tl.constexpr, SPLIT_K: tl.constexpr, SELF_MERGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Decode rows on the CUDA cores. Layout: x [M, K], qweight [K / pack, N], scales and zeros
    [G, N] (N contiguous). Grid (cdiv(N, BLOCK_N), SPLIT_K). Bytes: K * N * BITS / 8 + the
    scales and zeros, read once for all M rows; FLOPs 2 * M * N * K."""
    PACK: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PACK
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_words = tl.arange(0, WORDS)
    tile_start, tile_end = k_tile_range(K, BLOCK_K, SPLIT_K, pid_k)

    acc = tl.zeros((BLOCK_M, WORDS, BLOCK_N), dtype=tl.float32)
    for tile in tl.range(tile_start, tile_end, num_stages=NUM_STAGES):
        word_rows = tile * WORDS + offs_words
        mask_w = word_rows < K // PACK
        words = tl.load(qweight_ptr + word_rows[:, None] * stride_qk + offs_n[None, :],
                        mask=mask_w[:, None] & mask_n[None, :], other=0)
        words_high = words >> 16
        group = (tile * BLOCK_K) // group_size
        if HAS_ROW_GROUP:
            tile_acc = acc
        else:
            scale, zero = _plane_scales(scales_ptr, zeros_ptr, row_group_ptr, group, word_rows, mask_w,
                                        offs_n, mask_n, stride_sg, stride_zg, False)
            tile_acc = tl.zeros((BLOCK_M, WORDS, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(PACK):
            rows = word_rows * PACK + i
            # Value i sits at bit pos of its half-word: its plane is scaled by 2**pos.
            offset: tl.constexpr = 1 << ((i % (16 // BITS)) * BITS)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :],
                        mask=mask_m[:, None] & mask_w[None, :], other=0.0).to(tl.float32)
            x = x * (1.0 / offset)
            if HAS_ROW_GROUP:
                scale, zero = _plane_scales(scales_ptr, zeros_ptr, row_group_ptr, group, rows, mask_w,
                                            offs_n, mask_n, stride_sg, stride_zg, True)
                values = (_plane(words, words_high, i, BITS) - (_MAGIC + zero * offset)) * scale
            else:
                values = _plane(words, words_high, i, BITS) - (_MAGIC + zero * offset)
            tile_acc += x[:, :, None] * values[None, :, :]
        if HAS_ROW_GROUP:
            acc = tile_acc
        else:
            acc += tile_acc * scale[None, :, :]

    result = tl.sum(acc, axis=1)
    store_or_merge(result, out_ptr, workspace_ptr, count_ptr, offs_m, offs_n, mask_m, mask_n, M, N,
            stride_om, pid_n, pid_k, SPLIT_K, SELF_MERGE)


@triton.jit(do_not_specialize=["M"])
def _int_group_dot_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, row_group_ptr, out_ptr, workspace_ptr, count_ptr,
    M, N, K, group_size, stride_xm, stride_qk, stride_sg, stride_zg, stride_om,
    BITS: tl.constexpr, HAS_ROW_GROUP: tl.constexpr, SPLIT_K: tl.constexpr, SELF_MERGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Tensor-core tiles; same layout and bytes as the GEMV. Grid (cdiv(M, BLOCK_M) *
    cdiv(N, BLOCK_N), SPLIT_K), M tiles outermost."""
    PACK: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PACK
    tile_id = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = tile_id // num_n_tiles
    pid_n = tile_id % num_n_tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_words = tl.arange(0, WORDS)
    tile_start, tile_end = k_tile_range(K, BLOCK_K, SPLIT_K, pid_k)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in tl.range(tile_start, tile_end, num_stages=NUM_STAGES):
        word_rows = tile * WORDS + offs_words
        mask_w = word_rows < K // PACK
        words = tl.load(qweight_ptr + word_rows[:, None] * stride_qk + offs_n[None, :],
                        mask=mask_w[:, None] & mask_n[None, :], other=0)
        words_high = words >> 16
        group = (tile * BLOCK_K) // group_size
        if not HAS_ROW_GROUP:
            scale, zero = _plane_scales(scales_ptr, zeros_ptr, row_group_ptr, group, word_rows, mask_w,
                                        offs_n, mask_n, stride_sg, stride_zg, False)
        for i in tl.static_range(PACK):
            rows = word_rows * PACK + i
            # Value i sits at bit pos of its half-word: its plane is scaled by 2**pos.
            offset: tl.constexpr = 1 << ((i % (16 // BITS)) * BITS)
            if HAS_ROW_GROUP:
                scale, zero = _plane_scales(scales_ptr, zeros_ptr, row_group_ptr, group, rows, mask_w,
                                            offs_n, mask_n, stride_sg, stride_zg, True)
            # (q - zero) * scale is exact in float32, so the cast rounds it as the reference's
            # dequantized weight is rounded.
            values = (_plane(words, words_high, i, BITS) - (_MAGIC + zero * offset)) * (scale * (1.0 / offset))
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :],
                        mask=mask_m[:, None] & mask_w[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(x, values.to(x.dtype), input_precision="ieee")
            else:
                acc += tl.dot(x, values.to(x.dtype))

    store_or_merge(acc, out_ptr, workspace_ptr, count_ptr, offs_m, offs_n, mask_m, mask_n, M, N,
            stride_om, tile_id, pid_k, SPLIT_K, SELF_MERGE)


@dataclass(frozen=True)
class IntGroupConfig:
    """One launch: `dot` picks the tensor-core kernel over the GEMV."""

    dot: bool
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4


def launch_config(m: int, n: int, k: int, bits: int, tile_group: int, device: torch.device) -> IntGroupConfig:
    """Kernel, tiles and split-K for one shape (`benchmarks/int4_gemm.py --sweep`).
    `tile_group`: the K tile must divide it. A fixed rule, not a timing, so that two engines or
    two ranks compute the same shape the same way."""
    if m == 1:
        config = IntGroupConfig(dot=False, block_m=1, block_n=64, block_k=128, split_k=1, num_stages=4)
    elif m <= 16:
        config = IntGroupConfig(dot=True, block_m=16, block_n=64, block_k=128, split_k=1, num_stages=4)
    elif m <= 64:
        config = IntGroupConfig(dot=True, block_m=64, block_n=128, block_k=128, split_k=1, num_stages=3)
    else:
        config = IntGroupConfig(dot=True, block_m=128, block_n=128, block_k=128, split_k=1,
                                num_warps=8, num_stages=3)
    config = fit_to_groups(config, bits, tile_group)
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    k_tiles = triton.cdiv(k, config.block_k)
    # Enough programs to keep every SM busy: about four small ones (decode) or two large ones
    # per SM; a long prefill has that many output tiles already and does not split.
    return replace(config, split_k=split_for(tiles, k_tiles, 4 if m <= 64 else 2, device.index))


def fit_to_groups(config: IntGroupConfig, bits: int, tile_group: int) -> IntGroupConfig:
    """The K tile shrunk until it divides `tile_group`, but never below what the kernel needs:
    a dot over each plane needs 16 words; the GEMV at least one."""
    min_block_k = (32 // bits) * (16 if config.dot else 1)
    block_k = config.block_k
    while tile_group % block_k and block_k > min_block_k:
        block_k //= 2
    return replace(config, block_k=block_k)


def triton_int_group_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bits: int, group_size: int, perm: torch.Tensor | None = None,
    row_group: torch.Tensor | None = None, config: IntGroupConfig | None = None,
    split_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W` for a 2-D `x` [M, K] in the scales' dtype; same arguments as the reference.
    `config` overrides the launch rule (benchmarks/int4_gemm.py --sweep). `split_counts`: the
    layer's ops.split_k.split_count_buffer; without it a second kernel adds the splits."""
    if perm is not None:
        x = x.index_select(-1, perm.long())
    x = x.to(scales.dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[1]
    pack = 32 // bits
    if k % pack or qweight.shape[0] != k // pack:
        raise ValueError(f"x has {k} input features but the weight packs {qweight.shape[0] * pack}.")
    if qweight.stride(1) != 1 or scales.stride(1) != 1 or zeros.stride(1) != 1:
        raise ValueError("qweight, scales and zeros need contiguous output columns.")
    # One group (per-channel): any K tile fits.
    tile_group = (1 << 30) if group_size == -1 else group_size
    config = config or launch_config(m, n, k, bits, tile_group if row_group is None else 1 << 30, x.device)
    if row_group is None and tile_group % config.block_k:
        # The tiles cannot sit inside such groups: read each row's group instead.
        row_group = torch.arange(k, device=x.device, dtype=torch.int32) // group_size
    # The kernel's group of a tile is k0 // kernel_group_size: 0 for one group.
    kernel_group_size = tile_group if tile_group <= k else k + config.block_k
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    num_tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    self_merge = config.split_k > 1 and can_self_merge(split_counts, num_tiles)
    workspace = out if config.split_k == 1 else torch.empty((config.split_k, m, n), device=x.device, dtype=torch.float32)
    arguments = (
        x, qweight, scales, zeros, row_group if row_group is not None else qweight, out, workspace,
        split_counts if self_merge else qweight,
        m, n, k, kernel_group_size, x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
    )
    constants = dict(
        BITS=bits, HAS_ROW_GROUP=row_group is not None, SPLIT_K=config.split_k, SELF_MERGE=self_merge,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        NUM_STAGES=config.num_stages, num_warps=config.num_warps,
    )
    if config.dot:
        _int_group_dot_kernel[(num_tiles, config.split_k)](*arguments, IEEE=x.dtype == torch.float32, **constants)
    else:
        if config.block_m < m:
            raise ValueError(f"the GEMV config holds {config.block_m} rows; got {m}.")
        _int_group_gemv_kernel[(triton.cdiv(n, config.block_n), config.split_k)](*arguments, **constants)
    if config.split_k > 1 and not self_merge:
        sum_splits(workspace, out)
    return out
