"""TRITON_PAGED with a float8_e4m3fn KV cache against the TORCH_SDPA reference backend on the
same inputs: the cache write is bit-identical (both store key / k_scale rounded to e4m3) and the
outputs agree to bf16 precision (2e-2 of the largest value), for a mixed prefill/decode batch
with history in the cache. (The Triton interpreter cannot run these kernels: it rejects their
masked loads.)"""

from __future__ import annotations

import pytest
import torch
from test_triton_attention import make_batch

from pagedllm.layers.attention.backends.torch_sdpa import TorchSDPAAttention, to_cache_dtype

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("query_lens, seq_lens", [([1, 5, 1, 17], [40, 37, 3, 60]), ([1, 1], [33, 70])])
def test_fp8_cache_matches_the_reference_backend(query_lens, seq_lens) -> None:
    from pagedllm.layers.attention.backends.triton_paged import TritonPagedAttention

    device = "cuda"
    generator = torch.Generator().manual_seed(0)
    batch = make_batch(query_lens, seq_lens, 8, 2, 64, 16, torch.bfloat16, device=device, generator=generator)
    k_scale = torch.tensor(0.5, device=device)
    v_scale = torch.tensor(0.25, device=device)
    cache = torch.stack([to_cache_dtype(batch.kv_cache[0], FP8, k_scale), to_cache_dtype(batch.kv_cache[1], FP8, v_scale)])
    triton_cache, reference_cache = cache.clone(), cache.clone()
    out = TritonPagedAttention().forward(
        batch.query, batch.key, batch.value, triton_cache, batch.metadata, batch.scale,
        k_scale=k_scale, v_scale=v_scale,
    )
    ref = TorchSDPAAttention().forward(
        batch.query, batch.key, batch.value, reference_cache, batch.metadata, batch.scale,
        k_scale=k_scale, v_scale=v_scale,
    )
    assert torch.equal(triton_cache.view(torch.uint8), reference_cache.view(torch.uint8))
    real = batch.metadata.num_actual_tokens
    error = (out[:real].float() - ref[:real].float()).abs().max() / ref[:real].float().abs().max()
    assert error < 2e-2
