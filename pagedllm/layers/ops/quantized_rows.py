"""Per-token fp8 or int8 quantization of a row a kernel holds in registers, for kernels that
quantize their own output (RMSNorm: layers/quantization/quantized_activation.py) and the
GEMV. Same numbers as kernels.per_token_quant: scale = max(max|x| / qmax, 1e-12) (qmax 448 or
127), values x / scale (IEEE division), fp8: saturated to +-448 and rounded to nearest even by
the cast; int8: rounded half to even and clamped to [-128, 127]."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_e4m3(v):
    """v (float32, |v| <= 448) rounded half to even onto the float8_e4m3fn grid, as a float32:
    the grid step is 2^(exponent - 3) for normal values and 2^-9 below 2^-6, and adding then
    subtracting 1.5 * 2^23 steps rounds to it. The cast to fp8 afterwards is then exact (the
    Triton interpreter's own cast loses the carry into the exponent when it rounds up)."""
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step_exponent = tl.maximum(exponent - 3, -9)
    magic = (((step_exponent + 23 + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)
    return (v + magic) - magic


@triton.jit
def quantize_values(values, scale, IS_INT8: tl.constexpr, EXACT_ROUNDING: tl.constexpr):
    """float32 `values` / scale on the int8 grid (IS_INT8: half to even, as torch.round, by
    adding and subtracting 1.5 * 2^23; clamped to [-128, 127]) or the fp8 range (saturated to
    +-448; EXACT_ROUNDING: also rounded onto the e4m3 grid), as float32 ready for the cast."""
    q = tl.div_rn(values, scale)
    if IS_INT8:
        return tl.minimum(tl.maximum((q + 12582912.0) - 12582912.0, -128.0), 127.0)
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    if EXACT_ROUNDING:
        q = round_to_e4m3(q)
    return q


@triton.jit
def row_scale(amax, IS_INT8: tl.constexpr):
    """The per-token scale of a row whose largest |x| is amax: amax / qmax, at least 1e-12."""
    if IS_INT8:
        return tl.maximum(amax / 127.0, 1e-12)
    else:
        return tl.maximum(amax / 448.0, 1e-12)


@triton.jit
def store_row_quantized(values, mask, q_ptrs, scale_ptr, IS_INT8: tl.constexpr, EXACT_ROUNDING: tl.constexpr):
    """Quantizes one row (float32 `values`, lanes outside `mask` ignored) per token: stores
    the fp8 (or IS_INT8: int8) values at q_ptrs and the float32 scale at scale_ptr."""
    scale = row_scale(tl.max(tl.where(mask, tl.abs(values), 0.0), axis=0), IS_INT8)
    q = quantize_values(values, scale, IS_INT8, EXACT_ROUNDING)
    tl.store(q_ptrs, q.to(q_ptrs.dtype.element_ty), mask=mask)
    tl.store(scale_ptr, scale)
