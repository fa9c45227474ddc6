"""Decode-sized matmuls (1-8 rows) as one Triton kernel, for bf16/fp16 weights, for fp8
weights with per-channel scales (dynamic fp8's decode path) and for int8 weights with
per-channel scales and symmetric per-token int8 activations (W8A8 int8's decode path).

At M <= 8 rows a linear layer is a GEMV: it reads the whole [N, K] weight once and does almost
no arithmetic per byte, so its speed is the weight's bytes over the memory bandwidth. Each
program reads BLOCK_N rows of W (K slices of BLOCK_K per iteration, pipelined NUM_STAGES
deep), over all of K, or for long fp8 rows over one of split_k ranges (the last split adds
the partial sums: ops/split_k.py, the same sums every run). The output, its bias, and for
fp8 the activation quantization and both scales are done in the same kernel, and so is, when
the caller asks, the op that follows the projection (SiLU-and-mul after gate_up, rope after
qkv: ops/epilogue.py).

Three inner loops, picked per shape from the table measured on an H200
(`benchmarks/gemv_micro.py --sweep`): FMA (one row: multiply-add into a [BLOCK_N, BLOCK_K]
float32 tile, summed once at the end), and tl.dot in either operand order (rows padded to 16).

fp8: the activation rows are quantized per token (scale = max|x| / 448, the same rounding as
kernels.per_token_quant) or with a static input scale, and multiplied as the fp8 values they
are (products exact in float32), so the result is the w8a8 product torch._scaled_mm computes.
They are quantized inside the kernel, or for large weights and 2-8 rows by one launch first
(GemvConfig.quantize_first), so that fp8 x fp8 tensor-core dots read both operands straight
from memory.

int8: the rows are quantized per token first (kernels.per_token_quant: round half to even,
clamp to [-128, 127]; or with a static scale), then multiplied by int8 x int8 tensor-core dots
with int32 sums per K tile (exact), so the result is torch._int_mm's up to the float32 sum of
the tiles.

`should_use_gemv` is the dispatch rule the linear methods follow.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from pagedllm.layers.ops import INTERPRETED
from pagedllm.layers.ops.epilogue import Epilogue, plan_epilogue
from pagedllm.layers.ops.epilogue_kernels import epilogue_columns
from pagedllm.layers.ops.pdl import allow_next_kernel, pdl_launch_options, wait_for_previous_kernel
from pagedllm.layers.ops.quantized_rows import quantize_values, row_scale
from pagedllm.layers.ops.split_k import finish_splits, k_tile_range, split_outputs, store_or_merge

MAX_GEMV_ROWS = 8
FP8_DTYPE = torch.float8_e4m3fn
# Weights read as 8-bit values with per-channel scales.
_EIGHT_BIT_DTYPES = (FP8_DTYPE, torch.int8)

# fp8 weights of at least this many values (64 MiB) quantize their activations first.
_FP8_QUANTIZE_FIRST_MIN_WEIGHT = 64 << 20
# Inner loops.
FMA, DOT, DOT_SWAPPED = 0, 1, 2
# Activation handling (ACT_QUANTIZED: x arrives as 8-bit values of the weight's dtype with per-row scales).
ACT_NONE, ACT_FP8_DYNAMIC, ACT_FP8_STATIC, ACT_QUANTIZED = 0, 1, 2, 3


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, x_scale_ptr, bias_ptr, out_ptr, workspace_ptr, count_ptr,
    positions_ptr, cos_ptr, sin_ptr, stride_cos, rotated_columns, M, N, K,
    stride_xm, stride_wn, stride_w_scale, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INNER: tl.constexpr,
    ACT: tl.constexpr, W_SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
    NUM_STAGES: tl.constexpr, EXACT_ROUNDING: tl.constexpr, SPLIT_K: tl.constexpr, SELF_MERGE: tl.constexpr,
    IS_INT8: tl.constexpr, EPILOGUE: tl.constexpr, ROPE_HALF: tl.constexpr, EPILOGUE_RUN: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * w[n, k] (x quantized per ACT, times the scales, plus bias).
    EPILOGUE (ops/epilogue.py; split K then needs SELF_MERGE): 1, w stacks a gate and an up
    matrix of N / 2 rows each and out [M, N / 2] is silu(gate) * up; 2, out's heads of
    2 * ROPE_HALF features are rotated by rope at positions[m] (tables cos/sin
    [max_position, ROPE_HALF]) up to column rotated_columns.

    Layout: x [M, K], w [N, K] (last dims contiguous); w_scale [N] (stride 0 for one scale);
    ACT 3: x is fp8 (or int8, against int8 w: IS_INT8) already, with per-row scales x_scale [M].
    Grid: (cdiv(N, BLOCK_N), SPLIT_K); out [M, N] in out's dtype (split K: ops/split_k.py).
    Bytes: N * K * w elem (read once) + M * K * x elem; FLOPs 2 * M * N * K.
    """
    wait_for_previous_kernel(USE_PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_n, n_mask, rope_cos, rope_sin = epilogue_columns(
        pid_n, BLOCK_N, N, offs_m, m_mask, positions_ptr, cos_ptr, sin_ptr, stride_cos, rotated_columns,
        out_ptr.dtype.element_ty, EPILOGUE, ROPE_HALF, EPILOGUE_RUN)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn

    x_scale = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    if ACT == 1:
        amax = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        x_scale = row_scale(tl.max(amax, 1), False)
    elif ACT == 2:
        x_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(x_scale_ptr)
    elif ACT == 3:
        x_scale = tl.load(x_scale_ptr + offs_m, mask=m_mask, other=1.0)

    if INNER == 0:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    elif INNER == 1:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    tile_start, tile_end = k_tile_range(K, BLOCK_K, SPLIT_K, pid_k)
    for tile in tl.range(tile_start, tile_end, num_stages=NUM_STAGES):
        offs_k = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if ACT == 1 or ACT == 2:
            x = quantize_values(x.to(tl.float32), x_scale[:, None], False, EXACT_ROUNDING).to(tl.float8e4nv)
        # fp8 x fp8 products are exact in float32, so every inner loop gives the w8a8 sums;
        # int8 x int8 dots sum each tile exactly in int32.
        if INNER == 0:
            acc += w.to(tl.float32) * x.to(tl.float32)
        elif INNER == 1:
            if IS_INT8:
                acc += tl.dot(x, tl.trans(w), out_dtype=tl.int32).to(tl.float32)
            else:
                acc += tl.dot(x, tl.trans(w))
        else:
            if IS_INT8:
                acc += tl.dot(w, tl.trans(x), out_dtype=tl.int32).to(tl.float32)
            else:
                acc += tl.dot(w, tl.trans(x))
    allow_next_kernel(USE_PDL)

    if INNER == 0:
        result = tl.sum(acc, axis=1)[None, :]
    elif INNER == 1:
        result = acc
    else:
        result = tl.trans(acc)
    if ACT != 0:
        result = result * x_scale[:, None]
    if W_SCALED:
        w_scale = tl.load(w_scale_ptr + offs_n * stride_w_scale, mask=n_mask, other=1.0)
        result = result * w_scale[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            result += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    store_or_merge(result, out_ptr, workspace_ptr, count_ptr, offs_m, offs_n, m_mask, n_mask, M, N,
                   stride_om, pid_n, pid_k, SPLIT_K, SELF_MERGE, EPILOGUE, rope_cos, rope_sin)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    inner: int = FMA
    num_warps: int = 4
    num_stages: int = 3
    # fp8 weights: quantize the activations in a launch of their own first, so that the
    # kernel feeds fp8 x fp8 tensor-core dots straight from memory (in-kernel quantization
    # before a dot stalls the loads' pipeline: 5-30% of bandwidth on the H200).
    quantize_first: bool = False
    # Programs per output tile, each reading a K range (ops/split_k.py).
    split_k: int = 1


def default_config(
    num_rows: int, out_features: int, in_features: int, weight_dtype: torch.dtype, quantized_input: bool = False
) -> GemvConfig:
    """Tiles from the H200 sweep (`benchmarks/gemv_micro.py --sweep`, BENCHMARKS.md): the one
    config per class whose worst shape of Llama-3.1-8B is nearest its best. A fixed rule, not a
    timing: two engines (or two ranks) must pick the same kernel for the same shape, or their
    roundings, and so near-tie greedy tokens, could differ."""
    if weight_dtype == torch.int8:
        # The fp8 dots' tiles (int8 is read like fp8: one byte a weight, tensor-core dots on
        # rows quantized first); in-kernel int8 quantization is not implemented.
        return GemvConfig(block_n=64, block_k=256, inner=DOT_SWAPPED, num_warps=4, num_stages=5,
                          split_k=triton.cdiv(in_features, 8192), quantize_first=not quantized_input)
    if weight_dtype == FP8_DTYPE:
        # fp8 x fp8 tensor-core dots straight from memory. Long rows split K in slices of at
        # most 8192: down (K = 14336) reads at 85% in two splits against 77% whole, while
        # splitting K = 4096 (qkv, o) lost 1-3 points at every split tried (2, 3, 4, 6).
        dots = GemvConfig(block_n=64, block_k=256, inner=DOT_SWAPPED, num_warps=4, num_stages=5,
                          split_k=triton.cdiv(in_features, 8192))
        if quantized_input:
            # fp8 rows from the kernel that produced them.
            return dots
        # One row of a small weight: the extra launch costs more than the FMA loop's
        # arithmetic (qkv 60% vs 55%, down 67% vs 54%); gate_up (117 MB) is the reverse.
        # Eight rows of 1024 values a program: down 69.0% -> 74.7% of the copy bandwidth
        # against 16 rows of 512, o the same (49.0%, 48.5%).
        if num_rows == 1 and out_features * in_features < _FP8_QUANTIZE_FIRST_MIN_WEIGHT:
            return GemvConfig(block_n=8, block_k=1024, inner=FMA, num_warps=4, num_stages=3)
        return replace(dots, quantize_first=True)
    if num_rows == 1:
        return GemvConfig(block_n=8, block_k=512, inner=FMA, num_warps=4, num_stages=3)
    return GemvConfig(block_n=64, block_k=256, inner=DOT_SWAPPED, num_warps=4, num_stages=4)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    out_dtype: torch.dtype | None = None,
    split_counts: torch.Tensor | None = None,
    epilogue: Epilogue | None = None,
) -> torch.Tensor:
    """x [..., K] @ weight[N, K].T (+ bias) for at most MAX_GEMV_ROWS rows, like F.linear.
    `epilogue` (ops/epilogue.py): SiluAndMulEpilogue, the weight stacks gate and up halves and
    the result is silu(gate half) * up half, [..., N / 2]; RopeEpilogue, the q and k heads of
    the result are rotated. Either gives what the unfused kernel would give the plain product
    (one launch instead of two).

    An fp8 or int8 `weight` needs its float32 `weight_scale` ([N], [N, 1] or one value). x is
    then quantized to the weight's dtype per token (symmetric), or with the static
    `input_scale` when given; or x is of that dtype already and `input_scale` holds its
    per-row scales. The output has x's dtype, or
    `out_dtype` (needed when x is 8-bit). `split_counts`: the layer's
    ops.split_k.split_count_buffer, for configs that split K (else a second launch adds the
    splits)."""
    *lead, K = x.shape
    N = weight.shape[0]
    rows = x.reshape(-1, K)
    M = rows.shape[0]
    if M > MAX_GEMV_ROWS or weight.shape[1] != K:
        raise ValueError(f"gemv takes at most {MAX_GEMV_ROWS} rows of width {weight.shape[1]}; got {tuple(x.shape)}.")
    is_8bit = weight.dtype in _EIGHT_BIT_DTYPES
    is_int8 = weight.dtype == torch.int8
    if is_8bit and weight_scale is None:
        raise ValueError(f"gemv of a {weight.dtype} weight needs its weight_scale.")
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    config = config or default_config(M, N, K, weight.dtype, quantized_input=x.dtype == weight.dtype)
    if config.inner == FMA and M != 1:
        raise ValueError(f"the FMA GEMV takes one row; got {M}.")
    scale = None
    if weight_scale is not None:
        scale = weight_scale.reshape(-1).float()
        if scale.numel() not in (1, N):
            raise ValueError(f"weight_scale has {scale.numel()} values; gemv takes 1 or {N} (one per output).")
    if not is_8bit:
        act = ACT_NONE
    elif x.dtype == weight.dtype:
        act = ACT_QUANTIZED
    else:
        act = ACT_FP8_STATIC if input_scale is not None else ACT_FP8_DYNAMIC
    if act == ACT_QUANTIZED and (input_scale is None or out_dtype is None):
        raise ValueError(f"gemv of a {x.dtype} x needs its per-row input_scale and an out_dtype.")
    x_scale = None if input_scale is None else input_scale.reshape(-1).float()
    out_dtype = out_dtype or x.dtype
    if (config.quantize_first or is_int8) and act in (ACT_FP8_DYNAMIC, ACT_FP8_STATIC):
        rows, x_scale = _quantize_rows(rows, x_scale, weight.dtype)
        act = ACT_QUANTIZED
    if act == ACT_QUANTIZED:
        # One scale per row, contiguous (a caller's single or broadcast scale included).
        x_scale = x_scale.expand(M).contiguous()
    plan = plan_epilogue(epilogue, M, N, config.block_n, placeholder=rows)
    out = torch.empty((M, plan.out_features), dtype=out_dtype, device=x.device)
    # tl.dot needs 16 rows; the padding rows are masked loads (no memory traffic).
    block_m = 1 if config.inner == FMA else 16
    num_tiles = triton.cdiv(N, config.block_n)
    splits = split_outputs(out, config.split_k, num_tiles, split_counts, placeholder=rows, sums_shape=(M, N),
                           whole_sums_in_kernel=epilogue is not None)
    _gemv_kernel[(num_tiles, config.split_k)](
        rows, weight, scale if scale is not None else rows, x_scale if x_scale is not None else rows,
        bias if bias is not None else rows, out, splits.workspace, splits.counts, *plan.rope_args, M, N, K,
        rows.stride(0), weight.stride(0), 0 if scale is None or scale.numel() == 1 else 1, out.stride(0),
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, INNER=config.inner,
        ACT=act, W_SCALED=scale is not None, HAS_BIAS=bias is not None,
        NUM_STAGES=config.num_stages, EXACT_ROUNDING=INTERPRETED, SPLIT_K=config.split_k,
        SELF_MERGE=splits.self_merge, IS_INT8=is_int8, num_warps=config.num_warps, **plan.constexprs,
        **pdl_launch_options(x.device),
    )
    finish_splits(splits, out)
    return out.reshape(*lead, out.shape[-1])


def _quantize_rows(rows: torch.Tensor, static_scale: torch.Tensor | None,
                   qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """rows as `qdtype` (fp8 or int8) with per-row float32 scales [M]: dynamic per token (one
    launch), or with the static scale."""
    from pagedllm.layers.quantization.kernels.per_token_quant import per_token_quant
    from pagedllm.layers.quantization.kernels.w8a8 import quantize

    if static_scale is None:
        x_q, x_scale = per_token_quant(rows, qdtype)
        return x_q, x_scale.reshape(-1)
    return quantize(rows, static_scale, qdtype), static_scale.expand(rows.shape[0]).contiguous()


def should_use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ weight.T` runs as the Triton GEMV: half-precision CUDA activations of 1-8
    rows against a weight of their dtype or an fp8 or int8 one. On the Llama-3.1-8B shapes at these
    sizes cuBLAS reads bf16 weights at 61-107% of the copy bandwidth and this kernel at
    74-111%; torch._scaled_mm reads fp8 ones at 24-62%, this kernel at 40-84% (BENCHMARKS.md).
    A fixed rule, not a timing (see default_config)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not (x.is_cuda and 0 < rows <= MAX_GEMV_ROWS and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    return weight.dtype in (x.dtype, *_EIGHT_BIT_DTYPES)
