"""Per-token fp8 or int8 quantization of a row a kernel holds in registers, for kernels that
quantize their own output (RMSNorm: layers/quantization/quantized_activation.py) and the
GEMV. Same numbers as kernels.per_token_quant: scale = max(max|x| / qmax, 1e-12) (qmax 448 or
127), values x / scale (rounded as IEEE division rounds), fp8: saturated to +-448 and rounded
to nearest even by the cast; int8: rounded half to even and clamped to [-128, 127]."""

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
def divide_by_scale(values, scale, EXACT_ROUNDING: tl.constexpr):
    """values / scale (float32, scale positive and normal) as the 8-bit grids see
    tl.div_rn's quotient. IEEE division is a long sequence per value: it was about half the
    instructions of the fp8 one-row GEMV's loop, and made the quantizing RMSNorm 1.4 µs slower
    than the plain one. Here the reciprocal is divided once per scale, and each value takes
    a product and two FMA corrections (Markstein's), which give the correctly rounded quotient
    for normal operands. Left as the product: zeros (the corrections would turn -0 into +0)
    and quotients beyond 1e30 (they saturate to the same 8-bit value; the corrections could
    make an infinity NaN). tests/layers/ops/test_quantized_rows.py checks it against
    tl.div_rn on the GPU. The interpreter (EXACT_ROUNDING), whose FMA is not fused, divides."""
    if EXACT_ROUNDING:
        return tl.div_rn(values, scale)
    reciprocal = tl.div_rn(scale * 0.0 + 1.0, scale)
    quotient = values * reciprocal
    # tl.fma broadcasts nothing in every Triton version: full-shape operands.
    scale = tl.broadcast_to(scale, values.shape)
    reciprocal = tl.broadcast_to(reciprocal, values.shape)
    corrected = tl.fma(tl.fma(-quotient, scale, values), reciprocal, quotient)
    corrected = tl.fma(tl.fma(-corrected, scale, values), reciprocal, corrected)
    keep = (quotient == 0.0) | (tl.abs(quotient) > 1e30)
    return tl.where(keep, quotient, corrected)


@triton.jit
def quantize_values(values, scale, IS_INT8: tl.constexpr, EXACT_ROUNDING: tl.constexpr):
    """float32 `values` / scale on the int8 grid (IS_INT8: half to even, as torch.round, by
    adding and subtracting 1.5 * 2^23; clamped to [-128, 127]) or the fp8 range (saturated to
    +-448; EXACT_ROUNDING: also rounded onto the e4m3 grid), as float32 ready for the cast."""
    q = divide_by_scale(values, scale, EXACT_ROUNDING)
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
