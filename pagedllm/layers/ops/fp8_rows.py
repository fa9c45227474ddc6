"""Per-token fp8 quantization of a row a kernel holds in registers, for kernels that quantize
their own output (RMSNorm: layers/quantization/quantized_activation.py) and the
GEMV. Same numbers as kernels.per_token_quant: scale = max(max|x| / 448, 1e-12), values
x / scale (IEEE division) saturated to +-448 and rounded to nearest even by the cast."""

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
def store_row_fp8(values, mask, q_ptrs, scale_ptr, EXACT_ROUNDING: tl.constexpr):
    """Quantizes one row (float32 `values`, lanes outside `mask` ignored) per token: stores
    the fp8 values at q_ptrs and the float32 scale at scale_ptr."""
    amax = tl.max(tl.where(mask, tl.abs(values), 0.0), axis=0)
    scale = tl.maximum(amax / 448.0, 1e-12)
    q = tl.minimum(tl.maximum(tl.div_rn(values, scale), -448.0), 448.0)
    if EXACT_ROUNDING:
        q = round_to_e4m3(q)
    tl.store(q_ptrs, q.to(tl.float8e4nv), mask=mask)
    tl.store(scale_ptr, scale)
