"""silu(gate) * up over the two halves of a gate_up projection, as one Triton kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # older Triton layouts
    from triton.language.extra.cuda import libdevice

from pagedllm.layers.ops import INTERPRETED
from pagedllm.layers.ops.pdl import pdl_launch_options, start_after_previous_kernel

_BLOCK = 1024
# The interpreter has no libdevice (CPU tests of the kernels that use silu_mul).
_LIBDEVICE = tl.constexpr(not INTERPRETED)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x_row, stride_out_row, d, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """out[r, j] = to_dtype(silu(x[r, j])) * x[r, d + j], rounding where the torch ops do
    (silu computed in float32 as x / (1 + exp(-x)) and rounded, then the product rounded).

    Layout: x [rows, 2 * d], out [rows, d], last dims contiguous. Grid: (rows, cdiv(d, BLOCK)).
    Bytes: 3 * rows * d * elem; FLOPs: ~5 per output element plus one exp.
    """
    start_after_previous_kernel(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    x_row = x_ptr + row * stride_x_row
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + d + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + cols, silu_mul(gate, up, x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def silu_mul(gate, up, dtype: tl.constexpr):
    """silu(gate) * up in `dtype`, from float32 gate and up holding `dtype` values, rounded
    where the torch ops round (silu computed in float32 as x / (1 + exp(-x)) and rounded to
    dtype, then the product rounded). Also the GEMV's gate_up epilogue (ops/gemv.py)."""
    # libdevice's expf and an IEEE division are what torch's CUDA silu compiles to; tl.exp
    # and `/` are approximate and would move some results by an ulp.
    if _LIBDEVICE:
        activated = tl.math.div_rn(gate, 1.0 + libdevice.exp(-gate)).to(dtype).to(tl.float32)
    else:
        activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    return (activated * up).to(dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] → silu(x[..., :d]) * x[..., d:], a new contiguous [..., d] tensor.
    x may have any row stride; it is copied only if its last dim is not contiguous."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim (gate and up halves); got shape {tuple(x.shape)}.")
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.reshape(-1, 2 * d)
    block = min(_BLOCK, triton.next_power_of_2(d))
    grid = (rows.shape[0], triton.cdiv(d, block))
    stride_out_row = d  # out is contiguous
    _silu_and_mul_kernel[grid](rows, out, rows.stride(0), stride_out_row, d, BLOCK=block, num_warps=4,
                               **pdl_launch_options(x.device))
    return out
