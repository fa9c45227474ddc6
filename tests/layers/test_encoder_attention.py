"""Packed variable-length encoder attention equals attention over each sequence alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.layers.encoder_attention import varlen_attention


def _reference(q, k, v, bounds, scale):
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        out = F.scaled_dot_product_attention(*(t[start:end].transpose(0, 1) for t in (q, k, v)), scale=scale)
        parts.append(out.transpose(0, 1).reshape(end - start, -1))
    return torch.cat(parts)


def test_mixed_lengths_equal_per_sequence_attention():
    torch.manual_seed(0)
    bounds = [0, 4, 8, 11, 15, 16, 20]
    q, k, v = (torch.randn(20, 2, 8) for _ in range(3))
    torch.testing.assert_close(varlen_attention(q, k, v, bounds, 0.3), _reference(q, k, v, bounds, 0.3), atol=1e-6, rtol=1e-5)


def test_equal_lengths_take_the_reshape_path():
    torch.manual_seed(1)
    bounds = [0, 5, 10, 15]
    q, k, v = (torch.randn(15, 3, 4) for _ in range(3))
    torch.testing.assert_close(varlen_attention(q, k, v, bounds, 0.5), _reference(q, k, v, bounds, 0.5), atol=1e-6, rtol=1e-5)
