"""The epilogue of an int8 x int8 matmul (torch._int_mm's int32 sums) in one Triton launch:
the activation zero point taken off with the weight's row sums, both scales applied, the
result rounded to the output dtype and the bias added.

Written in torch it is four to six elementwise launches over a float32 [M, N] copy of the
sums; on the GPU that cost W8A8 int8 about as much as the matmul at batched-decode sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_N = 1024


@triton.jit
def _int8_epilogue_kernel(
    acc_ptr, x_scale_ptr, x_zero_ptr, w_scale_ptr, row_sums_ptr, bias_ptr, out_ptr, N,
    stride_acc, stride_out, stride_x_scale, stride_x_zero, stride_w_scale,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[m, n] = round((acc[m, n] - x_zero[m] * row_sums[n]) * x_scale[m] * w_scale[n]) + bias[n],
    in the order torch's expression (kernels.w8a8.int_mm_int8 on the CPU) rounds it.

    Layout: acc int32 [M, N], out [M, N] (last dims contiguous); per-row x_scale / x_zero and
    per-column w_scale with stride 0 for one value; row_sums / bias [N].
    Grid: (M, cdiv(N, BLOCK_N)). Bytes: M * N * (4 + out elem)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.load(acc_ptr + row * stride_acc + cols, mask=mask, other=0).to(tl.float32)
    if HAS_ZERO:
        zero = tl.load(x_zero_ptr + row * stride_x_zero).to(tl.float32)
        acc = acc - zero * tl.load(row_sums_ptr + cols, mask=mask, other=0.0)
    x_scale = tl.load(x_scale_ptr + row * stride_x_scale).to(tl.float32)
    w_scale = tl.load(w_scale_ptr + cols * stride_w_scale, mask=mask, other=0.0).to(tl.float32)
    out = (acc * x_scale * w_scale).to(out_ptr.dtype.element_ty)
    if HAS_BIAS:
        out = (out.to(tl.float32) + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32))
        out = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, out, mask=mask)


def int8_epilogue(
    acc: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor | None, weight_scale: torch.Tensor,
    weight_row_sums: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """acc int32 [M, N] (rows contiguous) → out [M, N] of out_dtype. x_scale / x_zero_point:
    one value or one per row; weight_scale: one value or one per column; weight_row_sums
    [N] with a zero point."""
    num_rows, num_columns = acc.shape
    if acc.stride(-1) != 1:
        raise ValueError(f"int8_epilogue needs int32 sums with contiguous rows; got strides {acc.stride()}.")
    out = torch.empty((num_rows, num_columns), dtype=out_dtype, device=acc.device)
    if num_rows == 0:
        return out
    x_scale = x_scale.reshape(-1).float()
    weight_scale = weight_scale.reshape(-1).float()
    x_zero = x_zero_point.reshape(-1).float() if x_zero_point is not None else x_scale
    if x_zero_point is not None and weight_row_sums is None:
        raise ValueError("int8_epilogue with an activation zero point needs the weight's row sums.")
    row_sums = weight_row_sums.reshape(-1).float() if weight_row_sums is not None else x_scale
    _int8_epilogue_kernel[(num_rows, triton.cdiv(num_columns, _BLOCK_N))](
        acc, x_scale, x_zero, weight_scale, row_sums, bias if bias is not None else x_scale, out, num_columns,
        acc.stride(0), out.stride(0), 0 if x_scale.numel() == 1 else 1, 0 if x_zero.numel() == 1 else 1,
        0 if weight_scale.numel() == 1 else 1,
        HAS_ZERO=x_zero_point is not None, HAS_BIAS=bias is not None, BLOCK_N=_BLOCK_N, num_warps=4,
    )
    return out
