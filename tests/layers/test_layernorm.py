"""RMSNorm against transformers' LlamaRMSNorm: bit-identical in bf16 and fp32 (same casts and
op order), including the fused residual add."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.layernorm import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_and_fused_add_are_bit_identical_to_transformers(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ours, theirs = RMSNorm(64, eps=1e-5).to(dtype), LlamaRMSNorm(64, eps=1e-5).to(dtype)
    weight = torch.randn(64, dtype=dtype)
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    x, residual = torch.randn(7, 64, dtype=dtype) * 3, torch.randn(7, 64, dtype=dtype)
    assert torch.equal(ours(x), theirs(x))
    normed, summed = ours(x, residual)
    assert torch.equal(summed, residual + x)
    assert torch.equal(normed, theirs(residual + x))
    assert normed.dtype == dtype


def test_silu_and_mul_gates_the_second_half_with_the_first() -> None:
    x = torch.randn(3, 10)
    torch.testing.assert_close(SiluAndMul()(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:])
