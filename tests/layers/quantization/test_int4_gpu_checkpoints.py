"""GPTQ / AWQ / compressed-tensors W4A16 checkpoints on CUDA: the Triton kernel path (CUDA
graphs on) against transformers with the dequantized weights, float32 on both sides.
Tolerance 1e-3 on prompt logprobs (float32 kernels on both sides, but the GPU's attention and
split-K atomic sums reorder additions; a wrong layout moves logprobs by 1e-2 or more)."""

from __future__ import annotations

import pytest
import torch
from int_group_checkpoints import assert_engine_matches_reference, write_quantized_checkpoint
from tiny_models import make_tiny_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize(
    "method, variant",
    [
        ("gptq", dict(bits=4, sym=True)),
        ("gptq", dict(bits=4, sym=False, desc_act=True)),
        ("gptq", dict(bits=8, sym=False)),
        ("awq", dict(sym=False)),
    ],
    ids=["gptq-4bit", "gptq-desc-act", "gptq-8bit", "awq"],
)
def test_quantized_checkpoint_on_cuda_matches_dequantized_transformers(tmp_path, method, variant):
    source = make_tiny_checkpoint(tmp_path / "src", "llama", seed=5)
    reference = write_quantized_checkpoint(source, tmp_path / method, method, **variant)
    assert_engine_matches_reference(tmp_path / method, reference, atol=1e-3)
