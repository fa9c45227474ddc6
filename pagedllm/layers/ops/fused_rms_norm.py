"""RMSNorm, alone or with the residual add fused in, as one Triton kernel per call.

Numerics follow transformers' LlamaRMSNorm (and layers/layernorm.py): the sum of squares and
the scaling run in float32, the normalised row is rounded to the input dtype, then multiplied
by the weight with one more rounding; the fused residual add rounds in the input dtype before
normalising, as the decoder layers do. Only the reduction order of the sum of squares
differs from torch, so bf16/fp16 results match torch bit for bit or within 1 ulp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.layers.ops import INTERPRETED
from pagedllm.layers.ops.pdl import pdl_launch_options, start_after_previous_kernel
from pagedllm.layers.ops.quantized_rows import store_row_quantized
from pagedllm.layers.quantization.quantized_activation import QuantizedActivation

MAX_HIDDEN_SIZE = 65536
"""One program holds a whole row in registers; above this it would spill."""


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    weight_ptr,
    out_ptr,
    rows_per_outer,
    stride_x_outer,
    stride_x_inner,
    stride_out_row,
    hidden_size,
    eps,
    scale_ptr,
    BLOCK: tl.constexpr,
    QUANT: tl.constexpr,
    IS_INT8: tl.constexpr,
    EXACT_ROUNDING: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """out[r] = weight * to_input_dtype(x[r] * rsqrt(mean(x[r]^2) + eps)).
    QUANT: out is fp8 (IS_INT8: int8), that row (rounded to the input dtype first) quantized per token with
    its scale at scale_ptr[r].

    Layout: x rows r = outer * rows_per_outer + inner at x_ptr + outer * stride_x_outer +
    inner * stride_x_inner, each of hidden_size contiguous elements (so a [T, H, D] view of
    a fused qkv output needs no copy); out [rows, hidden_size], row stride stride_out_row.
    Grid: (rows,). Bytes: 2 * rows * hidden_size * elem + the weight; FLOPs: ~4 per element.
    """
    start_after_previous_kernel(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    outer = row // rows_per_outer
    inner = row % rows_per_outer
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x_row = x_ptr + outer * stride_x_outer + inner * stride_x_inner
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=0) / hidden_size
    normed = (x * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = normed * weight
    if QUANT:
        store_row_quantized(out.to(x_ptr.dtype.element_ty).to(tl.float32), mask,
                            out_ptr + row * stride_out_row + cols, scale_ptr + row, IS_INT8, EXACT_ROUNDING)
    else:
        tl.store(out_ptr + row * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    stride_x_row,
    stride_residual_row,
    hidden_size,
    eps,
    q_ptr,
    scale_ptr,
    BLOCK: tl.constexpr,
    QUANT: tl.constexpr,
    IS_INT8: tl.constexpr,
    EXACT_ROUNDING: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """In place: residual[r] += x[r] (rounded to the input dtype); x[r] = rms_norm(residual[r]).
    QUANT: the norm goes to q [rows, hidden_size] as fp8 (IS_INT8: int8), quantized per token with its scale
    at scale_ptr[r], instead of to x.

    Layout: x, residual [rows, hidden_size], last dim contiguous. Grid: (rows,).
    Bytes: 4 * rows * hidden_size * elem (read both, write both) + the weight, against 10
    passes for the unfused torch chain.
    """
    start_after_previous_kernel(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    residual = tl.load(residual_ptr + row * stride_residual_row + cols, mask=mask, other=0.0).to(tl.float32)
    summed = (x + residual).to(dtype)
    tl.store(residual_ptr + row * stride_residual_row + cols, summed, mask=mask)
    s = summed.to(tl.float32)
    variance = tl.sum(s * s, axis=0) / hidden_size
    normed = (s * tl.rsqrt(variance + eps)).to(dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if QUANT:
        store_row_quantized((normed * weight).to(dtype).to(tl.float32), mask, q_ptr + row * hidden_size + cols,
                            scale_ptr + row, IS_INT8, EXACT_ROUNDING)
    else:
        tl.store(x_ptr + row * stride_x_row + cols, (normed * weight).to(dtype), mask=mask)


def _launch_shape(hidden_size: int, quantized: bool) -> tuple[int, int]:
    if hidden_size > MAX_HIDDEN_SIZE:
        raise ValueError(
            f"rms_norm: hidden size {hidden_size} is above the {MAX_HIDDEN_SIZE} one program can "
            "hold; use the torch RMSNorm (build the model on CPU) or split the row."
        )
    block = triton.next_power_of_2(hidden_size)
    # ~512 elements a warp: 8 warps for a 4096 row, 1 for a 128-wide head. A quantizing norm
    # takes half as many a warp: with IEEE division per value, a 4096 row took 3.12 µs at 8
    # warps and 2.69 µs at 16 on the H200, where the plain norm is fastest at 8 (1.72; 16: 1.79).
    elements_per_warp = 256 if quantized else 512
    return block, max(1, min(16, block // elements_per_warp))


def _check_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.shape != (x.shape[-1],) or weight.stride(-1) != 1:
        raise ValueError(
            f"rms_norm: weight must be a contiguous [{x.shape[-1]}] tensor for input of shape "
            f"{tuple(x.shape)}; got {tuple(weight.shape)} with strides {weight.stride()}."
        )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, quantize_to: torch.dtype | None = None
) -> torch.Tensor | QuantizedActivation:
    """weight * to_input_dtype(x * rsqrt(mean(x^2, -1) + eps)) over the last dim, returned as
    a new contiguous tensor of x's shape in the promoted dtype of x and weight; with
    quantize_to (float8_e4m3fn or int8) that tensor quantized per token, as a QuantizedActivation.

    x may be strided in its leading dims (e.g. [T, H, D] views of a qkv output); a copy is
    made only when its last dim is not contiguous or it has more than 3 dims that do not
    flatten to a view."""
    _check_weight(x, weight)
    hidden_size = x.shape[-1]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=quantize_to or out_dtype, device=x.device)
    result: torch.Tensor | QuantizedActivation = out
    scales = out  # a stand-in, never read, when nothing is quantized
    if quantize_to is not None:
        scales = torch.empty(x.numel() // max(hidden_size, 1), dtype=torch.float32, device=x.device)
        result = QuantizedActivation(out, scales, out_dtype)
    if x.numel() == 0:
        return result
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() > 3:
        x = x.reshape(-1, hidden_size)
    if x.dim() == 3:
        rows_per_outer, stride_outer, stride_inner = x.shape[1], x.stride(0), x.stride(1)
    elif x.dim() == 2:
        rows_per_outer, stride_outer, stride_inner = 1, x.stride(0), 0
    else:
        rows_per_outer, stride_outer, stride_inner = 1, 0, 0
    num_rows = x.numel() // hidden_size
    block, num_warps = _launch_shape(hidden_size, quantize_to is not None)
    stride_out_row = hidden_size  # out is contiguous
    _rms_norm_kernel[(num_rows,)](
        x, weight, out, rows_per_outer, stride_outer, stride_inner, stride_out_row, hidden_size, eps, scales,
        BLOCK=block, QUANT=quantize_to is not None, IS_INT8=quantize_to == torch.int8,
        EXACT_ROUNDING=INTERPRETED, num_warps=num_warps, **pdl_launch_options(x.device),
    )
    return result


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    quantize_to: torch.dtype | None = None,
) -> tuple[torch.Tensor | QuantizedActivation, torch.Tensor]:
    """In place, in one kernel: residual += x; x = rms_norm(residual). Returns (x, residual),
    the same tensors, now holding (norm(x + residual), x + residual). With quantize_to
    (float8_e4m3fn or int8) the norm is returned quantized per token, as a QuantizedActivation, and x
    is left as it was.

    x and residual have one shape and dtype with a contiguous last dim; weight has their
    dtype (the in-place result could not hold a promoted one)."""
    _check_weight(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype or weight.dtype != x.dtype:
        raise ValueError(
            "fused_add_rms_norm: x, residual and weight must share one dtype and x and residual "
            f"one shape; got x {x.dtype} {tuple(x.shape)}, residual {residual.dtype} "
            f"{tuple(residual.shape)}, weight {weight.dtype}."
        )
    if x.stride(-1) != 1 or residual.stride(-1) != 1:
        raise ValueError(
            "fused_add_rms_norm works in place and needs x and residual with a contiguous last "
            f"dim; got strides {x.stride()} and {residual.stride()}."
        )
    hidden_size = x.shape[-1]
    # view (not reshape): a copy would silently drop the in-place results.
    x_rows, residual_rows = x.view(-1, hidden_size), residual.view(-1, hidden_size)
    normed: torch.Tensor | QuantizedActivation = x
    q_rows = scales = x_rows
    if quantize_to is not None:
        q_rows = torch.empty(x.shape, dtype=quantize_to, device=x.device)
        scales = torch.empty(x_rows.shape[0], dtype=torch.float32, device=x.device)
        normed = QuantizedActivation(q_rows, scales, x.dtype)
    if x.numel() == 0:
        return normed, residual
    block, num_warps = _launch_shape(hidden_size, quantize_to is not None)
    _fused_add_rms_norm_kernel[(x_rows.shape[0],)](
        x_rows, residual_rows, weight, x_rows.stride(0), residual_rows.stride(0), hidden_size, eps, q_rows, scales,
        BLOCK=block, QUANT=quantize_to is not None, IS_INT8=quantize_to == torch.int8,
        EXACT_ROUNDING=INTERPRETED, num_warps=num_warps, **pdl_launch_options(x.device),
    )
    return normed, residual
