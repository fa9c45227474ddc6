"""Which GPU path a W8A8 layer takes (W8A8LinearMethod._choose_kernel), without a GPU: a
stand-in layer whose weight reports a CUDA device. Per-group activation scales vary along K,
so they cannot scale a row's sums after torch._scaled_mm / torch._int_mm: such layers keep the
reference path (dequantize, fake-quantize per group, matmul)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pagedllm.layers.quantization.w8a8 import FP8_DTYPE, W8A8LinearMethod, W8A8Scheme


def choose(scheme: W8A8Scheme, monkeypatch) -> str:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    weight = SimpleNamespace(device=torch.device("cuda", 0), shape=(256, 512))
    return W8A8LinearMethod(scheme)._choose_kernel(SimpleNamespace(weight=weight))


@pytest.mark.parametrize(("weight_dtype", "per_token_kernel"), [(FP8_DTYPE, "scaled_mm"), (torch.int8, "int_mm")])
def test_per_group_activations_keep_the_reference_path(weight_dtype, per_token_kernel, monkeypatch) -> None:
    assert choose(W8A8Scheme(weight_dtype, "channel"), monkeypatch) == per_token_kernel
    grouped = W8A8Scheme(weight_dtype, "channel", activation_group_size=128)
    assert choose(grouped, monkeypatch) == "reference"
