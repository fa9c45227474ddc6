"""cpu_offload_gb's hooks, exercised on CPU (the copy "to the device" is a copy to the CPU):
offloaded modules give the same outputs as the plain model, within the byte budget."""

from __future__ import annotations

import torch

from pagedllm.worker import cpu_offload


def test_offload_hooks_give_the_same_outputs_within_the_budget(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    inputs = torch.randn(3, 8)
    expected = model(inputs)
    # The pinned host buffers and the CUDA check are the only CUDA-specific parts.
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: torch.zeros(*a, **k))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    moved = cpu_offload.offload_weights_to_cpu(model, 8 * 8 * 4, torch.device("cuda"))
    assert moved == (8 * 8 + 8) * 4  # the first Linear (weight + bias), then the budget is spent
    original_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: original_to(self, "cpu"))
    with torch.inference_mode():
        torch.testing.assert_close(model(inputs), expected, rtol=0, atol=0)
