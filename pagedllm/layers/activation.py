"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.ops import triton_ops_available


class SiluAndMul(nn.Module):
    """[..., 2 * d] → silu(x[..., :d]) * x[..., d:] (the gate/up halves of gate_up_proj)."""

    def __init__(self) -> None:
        super().__init__()
        # Chosen once from the device the model is built on: one Triton kernel on CUDA, the
        # torch ops (the reference) elsewhere.
        self._forward_impl = self.forward_native
        if triton_ops_available(torch.get_default_device().type):
            from pagedllm.layers.ops.silu_and_mul import silu_and_mul

            self._forward_impl = silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class GeluTanhAndMul(nn.Module):
    """[..., 2 * d] → gelu_tanh(x[..., :d]) * x[..., d:] (Gemma's `gelu_pytorch_tanh` gate)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate="tanh") * x[..., d:]
