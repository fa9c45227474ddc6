"""The 8-bit quantizers' division (ops/quantized_rows.divide_by_scale: a reciprocal and two FMA
corrections) against IEEE division (tl.div_rn) on the GPU: the same float32 quotient for
normal operands, and the same fp8 and int8 values for every input, zeros of either sign,
ties of the 8-bit grids and saturating quotients included."""

from __future__ import annotations

import pytest
import torch

# Triton is not a declared dependency on the CPU.
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from pagedllm.layers.ops.quantized_rows import divide_by_scale, quantize_values  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

_BLOCK = 1024


@triton.jit
def _divide_kernel(values_ptr, scales_ptr, fast_ptr, ieee_ptr, fp8_ptr, int8_ptr, BLOCK: tl.constexpr):
    """Block b of values over scales[b]: the quotient both ways, and both 8-bit quantizations."""
    block = tl.program_id(0)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    values = tl.load(values_ptr + offs)
    scale = tl.load(scales_ptr + block)
    tl.store(fast_ptr + offs, divide_by_scale(values, scale, False))
    tl.store(ieee_ptr + offs, tl.div_rn(values, tl.full([BLOCK], 0.0, tl.float32) + scale))
    tl.store(fp8_ptr + offs, quantize_values(values, scale, False, False).to(tl.float8e4nv))
    tl.store(int8_ptr + offs, quantize_values(values, scale, True, False).to(tl.int8))


def _operands(num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows as the quantizers see them: bf16 activations over magnitudes 2^-40..2^40 with
    their per-token scales (max|x| / 448 or / 127, at least 1e-12), plus rows built to hit
    exact ties of the fp8 and int8 grids, zeros of both signs and quotients beyond the range."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    magnitudes = torch.exp2(torch.randint(-40, 41, (num_blocks, 1), device="cuda", generator=generator).float())
    values = (torch.randn(num_blocks, _BLOCK, device="cuda", generator=generator) * magnitudes)
    values = values.to(torch.bfloat16).float()
    values[:, :4] = torch.tensor([0.0, -0.0, 1e-45, -1e-45], device="cuda")
    qmax = torch.where(torch.arange(num_blocks, device="cuda") % 2 == 0, 448.0, 127.0)[:, None]
    scales = (values.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-12)
    # Ties: fp8 midpoints (k + 1/2) * 2^e / 8 and int8 ones k + 1/2, times the scale.
    ties = torch.arange(1, _BLOCK - 3, device="cuda").float()
    fp8_ties = (8 + (ties % 8) + 0.5) * torch.exp2((ties % 12) - 9) / 8
    values[0::4, 4:] = (fp8_ties[None, :] * scales[0::4]).clamp(max=3e38)
    values[1::4, 4:] = (((ties % 127) + 0.5) * torch.where(ties % 2 == 0, 1.0, -1.0))[None, :] * scales[1::4]
    # Quotients far past saturation, for the static-scale path.
    values[2::8, 4:64] = 1e35
    return values.contiguous(), scales.reshape(-1).contiguous()


def test_divide_by_scale_gives_the_ieee_quotient_and_the_same_8_bit_values() -> None:
    values, scales = _operands(num_blocks=4096)
    fast, ieee = torch.empty_like(values), torch.empty_like(values)
    fp8 = torch.empty(values.shape, dtype=torch.float8_e4m3fn, device="cuda")
    int8 = torch.empty(values.shape, dtype=torch.int8, device="cuda")
    _divide_kernel[(values.shape[0],)](values, scales, fast, ieee, fp8, int8, BLOCK=_BLOCK)
    # Normal operands and quotients (the GPU may flush subnormal ones to zero; the 8-bit
    # values below cover them).
    normal = (values.abs() >= 2.0**-126) & (ieee.abs() >= 2.0**-126) & (ieee.abs() <= 1e30)
    assert normal.float().mean() > 0.9
    assert torch.equal(fast[normal].view(torch.int32), ieee[normal].view(torch.int32))
    expected_fp8 = ieee.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    assert torch.equal(fp8.view(torch.uint8), expected_fp8.view(torch.uint8))
    expected_int8 = torch.round(ieee).clamp(-128, 127).to(torch.int8)
    assert torch.equal(int8, expected_int8)
