"""8-bit weight x 8-bit activation arithmetic: rounding to float8_e4m3fn / int8, the reference
matmul (dequantize, then multiply in the activations' dtype) and the GPU paths
(`torch._scaled_mm` for fp8, `torch._int_mm` for int8).

Scales are float32 and multiply: real = quantized * scale (minus the zero point for int8).
Quantization rounds weights and activations only; the matmul output is never rounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
INT8_MIN, INT8_MAX = -128, 127
# Smallest scale, so that an all-zero row or tensor does not divide by zero.
_MIN_SCALE = 1e-12


def qmax_of(dtype: torch.dtype) -> float:
    return FP8_MAX if dtype == FP8_DTYPE else float(INT8_MAX)


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
             zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """`x / scale` rounded to `dtype` (fp8: nearest representable, saturating; int8: nearest
    integer plus the zero point, clamped to [-128, 127])."""
    scaled = x.float() / scale
    if dtype == FP8_DTYPE:
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    scaled = torch.round(scaled)
    if zero_point is not None:
        scaled = scaled + zero_point.float()
    return scaled.clamp(INT8_MIN, INT8_MAX).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
               zero_point: torch.Tensor | None = None) -> torch.Tensor:
    values = q.float()
    if zero_point is not None:
        values = values - zero_point.float()
    return (values * scale).to(dtype)


def absmax_scale(x: torch.Tensor, dim: int | tuple[int, ...] | None, qdtype: torch.dtype) -> torch.Tensor:
    """Symmetric scale mapping the largest |x| (over `dim`, kept; None: the whole tensor) to the
    largest value of `qdtype`."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    return (amax.float() / qmax_of(qdtype)).clamp(min=_MIN_SCALE)


def asymmetric_token_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 scale and zero point covering [min, max] of each row (0 included)."""
    low = x.amin(dim=-1, keepdim=True).float().clamp(max=0)
    high = x.amax(dim=-1, keepdim=True).float().clamp(min=0)
    scale = ((high - low) / (INT8_MAX - INT8_MIN)).clamp(min=_MIN_SCALE)
    zero_point = torch.round(INT8_MIN - low / scale).clamp(INT8_MIN, INT8_MAX)
    return scale, zero_point


def quantize_activation(
    x: torch.Tensor, qdtype: torch.dtype, static_scale: torch.Tensor | None,
    static_zero_point: torch.Tensor | None, symmetric: bool, group_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [T, K] → (quantized [T, K], scale, zero point or None). Static: one scale for the tensor;
    dynamic: one per token ([T, 1]), or per token and group of `group_size` columns ([T, K/g])."""
    if static_scale is not None:
        return quantize(x, static_scale, qdtype, static_zero_point), static_scale, static_zero_point
    if group_size is not None:
        num_columns = x.shape[-1]
        # A last, partial group (columns not a multiple of group_size) is zero-padded.
        groups = F.pad(x, (0, -num_columns % group_size)).unflatten(-1, (-1, group_size))
        scale = absmax_scale(groups, -1, qdtype)
        q = quantize(groups, scale, qdtype).flatten(-2)[..., :num_columns]
        return q, scale.squeeze(-1), None
    if not symmetric:
        scale, zero_point = asymmetric_token_qparams(x)
        return quantize(x, scale, qdtype, zero_point), scale, zero_point
    scale = absmax_scale(x, -1, qdtype)
    return quantize(x, scale, qdtype), scale, None


def fake_quantize_activation(
    x: torch.Tensor, qdtype: torch.dtype, static_scale: torch.Tensor | None,
    static_zero_point: torch.Tensor | None, symmetric: bool, group_size: int | None,
) -> torch.Tensor:
    """x rounded as `quantize_activation` rounds it, back in x's dtype."""
    q, scale, zero_point = quantize_activation(x, qdtype, static_scale, static_zero_point, symmetric, group_size)
    if group_size is not None:
        per_column = scale.repeat_interleave(group_size, dim=-1)[..., : x.shape[-1]]
        return dequantize(q, per_column, x.dtype)
    return dequantize(q, scale, x.dtype, zero_point)


def scaled_mm_fp8(
    x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """fp8 x_q [M, K] (scales [M, 1] or scalar) times fp8 weight [N, K] (scales [N, 1]) through
    torch._scaled_mm with row-wise scales (bf16 output, which row-wise scaling requires)."""
    num_tokens = x_q.shape[0]
    scale_a = x_scale.float().expand(num_tokens, 1).contiguous()
    scale_b = weight_scale.float().reshape(1, -1).contiguous()
    out = torch._scaled_mm(x_q, weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
    if isinstance(out, tuple):  # torch < 2.5 returned (out, amax)
        out = out[0]
    out = out.to(out_dtype)
    return out if bias is None else out + bias


# torch._int_mm on CUDA needs more than 16 rows.
_INT_MM_MIN_ROWS = 17


def int_mm_int8(
    x_q: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor | None,
    weight: torch.Tensor, weight_scale: torch.Tensor, weight_row_sums: torch.Tensor | None,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """int8 x_q [M, K] times int8 weight [N, K] in int32 (torch._int_mm), then scaled; an
    activation zero point is removed with the weight's row sums: (x_q - z) W = x_q W - z sum(W).
    On the GPU the scaling is one launch (kernels/int8_epilogue.py)."""
    num_tokens = x_q.shape[0]
    if num_tokens < _INT_MM_MIN_ROWS:
        x_q = F.pad(x_q, (0, 0, 0, _INT_MM_MIN_ROWS - num_tokens))
    sums = torch._int_mm(x_q, weight.t())[:num_tokens]
    if sums.is_cuda:
        # Imported here: the Triton module is only wanted on the GPU paths.
        from pagedllm.layers.quantization.kernels.int8_epilogue import int8_epilogue

        return int8_epilogue(sums, x_scale, x_zero_point, weight_scale, weight_row_sums, bias, out_dtype)
    acc = sums.float()
    if x_zero_point is not None:
        assert weight_row_sums is not None
        acc = acc - x_zero_point.float() * weight_row_sums.reshape(1, -1)
    out = (acc * x_scale.float() * weight_scale.float().reshape(1, -1)).to(out_dtype)
    return out if bias is None else out + bias
