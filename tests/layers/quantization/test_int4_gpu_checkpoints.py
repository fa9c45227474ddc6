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


@pytest.mark.parametrize(
    "quantization_config",
    [
        {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
        {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    ],
    ids=["gptq", "awq"],
)
def test_dummy_llama_8b_int4_fits_in_a_third_of_bf16_and_generates(tmp_path, quantization_config):
    """Llama-3.1-8B's config.json with a 4-bit quantization_config, random weights: 5.4 GiB of
    weights (bf16: 15.0 GiB), and a batch of greedy decodes through CUDA graphs."""
    import gc
    import json

    from pagedllm import LLM, SamplingParams

    from benchmarks.common import LLAMA_3_1_8B

    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_3_1_8B, "quantization_config": quantization_config}))
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, load_format="dummy", max_model_len=1024,
              gpu_memory_utilization=0.5)
    try:
        model = llm.llm_engine.executor.worker.model_runner.model
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        assert weight_bytes < 5.6 * 2**30
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": list(range(1, 20 + i))} for i in range(8)], params,
                               use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 16 for o in outputs)
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
