"""load_format="dummy" with quantized layers (the benchmarks' setup): 8-bit weights over their
whole range, positive scales mapping them to ~1e-3, and a forward pass that stays finite."""

from __future__ import annotations

import json

import pytest
import torch

from pagedllm import LLM, SamplingParams

INT8_W8A8 = {
    "quant_method": "compressed-tensors", "format": "int-quantized",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True},
    }},
}


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_dummy_weights_of_quantized_layers_are_usable(tiny_checkpoints, tmp_path, scheme) -> None:
    config = json.loads((tiny_checkpoints["llama"] / "config.json").read_text())
    options = {}
    if scheme == "fp8":
        options["quantization"] = "fp8"
    else:
        config["quantization_config"] = INT8_W8A8
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, dtype="float32",
              kv_cache_memory_bytes=1 << 24, **options)
    layer = llm.llm_engine.engine_core.executor.worker.model_runner.model.model.layers[0].mlp.down_proj
    assert layer.weight.float().abs().max() > 100
    assert (layer.weight_scale > 0).all()
    dequantized = layer.quant_method.dequantized_weight(layer, torch.float32)
    assert 5e-4 < dequantized.abs().max() <= 1e-3 + 1e-9
    params = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=1)
    output = llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)[0].outputs[0]
    assert len(output.token_ids) == 4
    assert all(torch.isfinite(torch.tensor(lp[t].logprob)) for lp, t in zip(output.logprobs, output.token_ids))
