"""load_format='dummy' with a GPTQ / AWQ / compressed-tensors W4A16 config.json (how the
benchmarks run Llama-3.1-8B without its weights): the quantized layers get valid packed
integers, small positive scales and in-order g_idx, so generation runs and stays finite."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_tiny_checkpoint

from pagedllm import LLM, SamplingParams
from pagedllm.layers.quantization.kernels.int_group import dequantize

CONFIGS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_dummy_quantized_model_has_sane_params_and_generates(tmp_path, method):
    path = make_tiny_checkpoint(tmp_path / "model", "llama")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = CONFIGS[method]
    (path / "config.json").write_text(json.dumps(config))
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", load_format="dummy",
              kv_cache_memory_bytes=1 << 24)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=1)
    output = llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)[0]
    assert len(output.outputs[0].token_ids) == 4
    assert all(torch.isfinite(torch.tensor(lp[t].logprob)) for lp, t in
               zip(output.outputs[0].logprobs, output.outputs[0].token_ids))
    model = llm.llm_engine.executor.worker.model_runner.model
    layer = model.model.layers[0].self_attn.qkv_proj
    assert layer.qweight.dtype == torch.int32 and bool((layer.scales > 0).all())
    weight = dequantize(layer.qweight, layer.scales, layer.zeros, 4, 32,
                        layer.row_group[0] if method == "gptq" else None)
    assert 0 < weight.abs().max() < 0.01
