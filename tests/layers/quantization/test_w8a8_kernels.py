"""The rounding helpers of kernels/w8a8.py against direct formulas."""

from __future__ import annotations

import torch

from pagedllm.layers.quantization.kernels.w8a8 import FP8_DTYPE, fake_quantize_activation


def test_group_quantization_pads_a_partial_last_group() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 40)
    got = fake_quantize_activation(x, FP8_DTYPE, None, None, True, 16)
    expected = []
    for start in range(0, 40, 16):
        part = x[:, start : start + 16]
        scale = part.abs().amax(-1, keepdim=True) / 448
        expected.append((part / scale).to(FP8_DTYPE).float() * scale)
    assert torch.equal(got, torch.cat(expected, dim=1))


def test_asymmetric_int8_tokens_cover_their_range() -> None:
    x = torch.tensor([[0.5, 1.0, 3.0, 2.0]])  # all positive: the zero point moves the grid
    got = fake_quantize_activation(x, torch.int8, None, None, False, None)
    assert (got - x).abs().max() <= (3.0 / 255) / 2 + 1e-6
