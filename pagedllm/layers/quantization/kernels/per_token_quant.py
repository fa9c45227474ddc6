"""Per-token symmetric quantization of activations in one Triton launch (fp8 or int8): each
program reads its row twice (largest |x|, then x / scale), which for decode-sized batches is
one launch instead of the five of the torch expression (abs, amax, divide, clamp, cast)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.layers.ops import INTERPRETED
from pagedllm.layers.ops.pdl import pdl_launch_options, start_after_previous_kernel
from pagedllm.layers.ops.quantized_rows import quantize_values, row_scale
from pagedllm.layers.quantization.kernels.w8a8 import FP8_DTYPE

# Columns one program handles per loop iteration.
_MAX_BLOCK = 8192


@triton.jit
def _per_token_quant_kernel(
    x_ptr, q_ptr, scale_ptr, num_columns, stride_x, stride_q,
    IS_INT8: tl.constexpr, EXACT_ROUNDING: tl.constexpr, BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Row r: scale[r] = max(|x[r]|) / qmax (at least 1e-12); q[r] = x[r] / scale[r], saturated
    (fp8) or rounded half to even and clamped to [-128, 127] (int8): ops/quantized_rows.py.
    Grid: (rows,)."""
    start_after_previous_kernel(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_columns, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < num_columns, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = row_scale(tl.max(amax, 0), IS_INT8)
    tl.store(scale_ptr + row, scale)
    for start in range(0, num_columns, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < num_columns, other=0.0).to(tl.float32)
        q = quantize_values(x, scale, IS_INT8, EXACT_ROUNDING)
        tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=cols < num_columns)


def per_token_quant(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (last dim contiguous) → (quantized [M, K] of qdtype, float32 scales [M, 1]),
    as kernels.w8a8.quantize_activation computes them for symmetric dynamic activations."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_rows, num_columns = x.shape
    q = torch.empty((num_rows, num_columns), dtype=qdtype, device=x.device)
    scale = torch.empty((num_rows, 1), dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return q, scale
    block = min(triton.next_power_of_2(num_columns), _MAX_BLOCK)
    _per_token_quant_kernel[(num_rows,)](
        x, q, scale, num_columns, x.stride(0), q.stride(0),
        IS_INT8=qdtype != FP8_DTYPE, EXACT_ROUNDING=INTERPRETED, BLOCK=block, num_warps=8 if block >= 4096 else 4,
        **pdl_launch_options(x.device),
    )
    return q, scale
