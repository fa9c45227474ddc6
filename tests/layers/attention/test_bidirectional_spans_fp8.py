"""Gemma 3's image-prefill steps with an fp8 KV cache: the Triton backend hands them to the
torch SDPA reference together with the layer's k/v scales, so both backends store and read
the cache alike (equal to 1e-6), and the scales do change the result."""

from __future__ import annotations

import pytest
import torch
from test_bidirectional_spans import BLOCK, HEAD, HEADS, KV_HEADS, NUM_BLOCKS, SCALE, step_metadata

from pagedllm.layers.attention.backends.torch_sdpa import FP8_KV_DTYPE, TorchSDPAAttention


def _run(backend, k_scale, v_scale) -> torch.Tensor:
    torch.manual_seed(0)
    query_lens, seq_lens, tables = [9, 5], [9, 5], [[3, 7, 1], [5, 0]]
    metadata = step_metadata(query_lens, seq_lens, tables, [[(2, 6)], []])
    kv_cache = torch.zeros((2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD), dtype=FP8_KV_DTYPE)
    query = torch.randn(sum(query_lens), HEADS, HEAD)
    key, value = torch.randn(sum(seq_lens), KV_HEADS, HEAD) * 4, torch.randn(sum(seq_lens), KV_HEADS, HEAD) * 4
    return backend.forward(query, key, value, kv_cache, metadata, SCALE, k_scale=k_scale, v_scale=v_scale)


def test_triton_hand_off_passes_the_fp8_kv_scales() -> None:
    pytest.importorskip("triton")
    from pagedllm.layers.attention.backends.triton_paged import TritonPagedAttention

    k_scale, v_scale = torch.tensor(0.02), torch.tensor(0.03)
    reference = _run(TorchSDPAAttention(sliding_window=3), k_scale, v_scale)
    torch.testing.assert_close(_run(TritonPagedAttention(sliding_window=3), k_scale, v_scale), reference, atol=1e-6, rtol=0)
    unscaled = _run(TorchSDPAAttention(sliding_window=3), None, None)
    assert (unscaled - reference).abs().max() > 1e-2
