"""The one-launch epilogue of int8 matmuls (kernels/int8_epilogue.py) against the torch
expression it replaces on the GPU (kernels.w8a8.int_mm_int8's CPU path): per-token and static
activation scales, an activation zero point with the weight's row sums, per-channel and
per-tensor weight scales, a bias. On the CPU under the Triton interpreter; gpu-marked on CUDA.
Tolerance: float32 out 1e-6 relative (the compiler may fuse the zero-point product into an
FMA); 16-bit out one unit in the last place (the interpreter truncates to bf16)."""

from __future__ import annotations

import pytest
import torch

from pagedllm.layers.quantization.kernels.int8_epilogue import int8_epilogue


def torch_epilogue(acc, x_scale, x_zero, w_scale, row_sums, bias, out_dtype):
    result = acc.float()
    if x_zero is not None:
        result = result - x_zero.float() * row_sums.reshape(1, -1)
    out = (result * x_scale.float() * w_scale.float().reshape(1, -1)).to(out_dtype)
    return out if bias is None else out + bias


CASES = [
    # (rows, columns, per-token scale, zero point, per-channel weight scale, bias)
    (5, 1500, True, False, True, False),
    (3, 700, True, True, True, True),
    (17, 96, False, True, False, True),
    (1, 2048, False, False, True, True),
]


def check_epilogue(device: str, rows, columns, per_token, zero, per_channel, with_bias, out_dtype) -> None:
    generator = torch.Generator().manual_seed(rows * 1000 + columns)
    acc = torch.randint(-2**20, 2**20, (rows, columns), generator=generator, dtype=torch.int32)
    x_scale = torch.rand(rows if per_token else 1, 1, generator=generator) * 1e-2 + 1e-4
    x_zero = torch.randint(-128, 128, (rows if per_token else 1, 1), generator=generator).float() if zero else None
    w_scale = torch.rand(columns if per_channel else 1, 1, generator=generator) * 1e-3 + 1e-5
    row_sums = torch.randint(-5000, 5000, (columns,), generator=generator).float() if zero else None
    bias = torch.randn(columns, generator=generator).to(out_dtype) if with_bias else None
    moved = [t.to(device) if t is not None else None for t in (acc, x_scale, x_zero, w_scale, row_sums, bias)]
    got = int8_epilogue(*moved, out_dtype).cpu()
    expected = torch_epilogue(acc, x_scale, x_zero, w_scale, row_sums, bias, out_dtype)
    assert got.dtype == out_dtype and got.shape == (rows, columns)
    if out_dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    else:
        ulp = 2**-7 if out_dtype == torch.bfloat16 else 2**-10
        torch.testing.assert_close(got.float(), expected.float(), rtol=ulp, atol=ulp * expected.float().abs().max().item())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu test covers CUDA")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_epilogue_matches_torch_under_the_interpreter(case, out_dtype) -> None:
    check_epilogue("cpu", *case, out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_epilogue_matches_torch_on_the_gpu(case, out_dtype) -> None:
    check_epilogue("cuda", *case, out_dtype)


def test_a_zero_point_without_row_sums_is_refused() -> None:
    acc = torch.zeros(2, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="row sums"):
        int8_epilogue(acc, torch.ones(1), torch.zeros(1), torch.ones(8), None, None, torch.float32)
