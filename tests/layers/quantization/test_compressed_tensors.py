"""compressed-tensors W8A8 checkpoints written by the compressed-tensors package itself (fp8
channel + dynamic per-token, fp8 tensor + static, fp8 block + per-token groups, int8 channel +
dynamic, int8 tensor + static)
against transformers on the dequantized weights with fake-quantized activations in float32.
Tolerance as in test_fp8.py (2e-3 on every returned logprob; the unquantized model is farther)."""

from __future__ import annotations

import pytest
import torch
from quant_reference import (
    fp8_per_token,
    fp8_per_token_group,
    fp8_static,
    int8_per_token,
    int8_static,
    pack_compressed_tensors,
    reference_model,
    unpack_compressed_tensors,
)
from safetensors.torch import load_file
from test_fp8 import check_against_reference, make_llm

from pagedllm.layers.quantization.compressed_tensors import CompressedTensorsConfig

FP8_CHANNEL = dict(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
FP8_TENSOR = dict(FP8_CHANNEL, strategy="tensor")
INT8_CHANNEL = dict(FP8_CHANNEL, type="int")
INT8_TENSOR = dict(INT8_CHANNEL, strategy="tensor")
TOKEN = dict(strategy="token", symmetric=True, dynamic=True)
STATIC = dict(strategy="tensor", symmetric=True, dynamic=False)

CASES = {
    "fp8-channel-dynamic": (FP8_CHANNEL, dict(TOKEN, num_bits=8, type="float"), "float-quantized", fp8_per_token),
    "fp8-tensor-static": (FP8_TENSOR, dict(STATIC, num_bits=8, type="float"), "float-quantized", fp8_static),
    "int8-channel-dynamic": (INT8_CHANNEL, dict(TOKEN, num_bits=8, type="int"), "int-quantized", int8_per_token),
    "int8-tensor-static": (INT8_TENSOR, dict(STATIC, num_bits=8, type="int"), "int-quantized", int8_static),
}


@pytest.mark.parametrize("case", CASES)
def test_compressed_tensors_w8a8_matches_reference(tiny_checkpoints, tmp_path, case) -> None:
    llama = tiny_checkpoints["llama"]
    weights, activations, fmt, activation_quant = CASES[case]
    path = pack_compressed_tensors(llama, tmp_path / case, weights, activations, fmt)
    tensors = load_file(path / "model.safetensors")
    if not activations["dynamic"]:
        scales = {k.removesuffix(".input_scale"): v for k, v in tensors.items() if k.endswith(".input_scale")}
        activation_quant = activation_quant(scales)
    model = reference_model(llama, unpack_compressed_tensors(tensors), activation_quant)
    check_against_reference(make_llm(path), model, llama)


def test_compressed_tensors_fp8_block_matches_reference(tiny_checkpoints, tmp_path) -> None:
    llama = tiny_checkpoints["llama"]
    block = (16, 32)
    weights = dict(FP8_CHANNEL, strategy="block", block_structure=list(block))
    activations = dict(num_bits=8, type="float", strategy="group", group_size=block[1], symmetric=True, dynamic=True)
    path = pack_compressed_tensors(llama, tmp_path / "block", weights, activations, "float-quantized")
    tensors = load_file(path / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (64 // 16, 128 // 32)
    model = reference_model(llama, unpack_compressed_tensors(tensors, block), fp8_per_token_group(block[1]))
    check_against_reference(make_llm(path), model, llama)


def config_with(**group) -> dict:
    base = {"targets": ["Linear"], "weights": dict(FP8_CHANNEL), "input_activations": None}
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {**base, **group}}, "ignore": ["lm_head", "re:.*mlp\\.down_proj$"]}


def test_ignore_entries_and_regexes_leave_layers_unquantized() -> None:
    config = CompressedTensorsConfig.from_config(config_with())
    assert type(config.get_linear_method(None, "model.layers.0.mlp.down_proj")).__name__ == "UnquantizedLinearMethod"
    assert type(config.get_linear_method(None, "model.layers.0.self_attn.qkv_proj")).__name__ == "W8A8LinearMethod"


def test_pack_quantized_dispatches_to_wna16(monkeypatch) -> None:
    import sys
    import types

    seen = {}
    module = types.ModuleType("pagedllm.layers.quantization.compressed_tensors_wNa16")
    module.CompressedTensorsWNA16 = lambda **kwargs: seen.update(kwargs) or "wna16"
    monkeypatch.setitem(sys.modules, module.__name__, module)
    weights = dict(num_bits=4, type="int", strategy="group", group_size=128, symmetric=True, actorder=None)
    config = CompressedTensorsConfig.from_config(config_with(weights=weights, format="pack-quantized"))
    assert config.get_linear_method(None, "model.layers.0.self_attn.qkv_proj") == "wna16"
    assert seen == {"num_bits": 4, "group_size": 128, "symmetric": True, "strategy": "group", "actorder": None}


@pytest.mark.parametrize("bad, message", [
    ({"format": "marlin-24"}, "format='marlin-24'"),
    ({"weights": dict(FP8_CHANNEL, strategy="nonsense")}, "strategy='nonsense'"),
])
def test_unsupported_config_is_a_value_error_naming_it(bad, message) -> None:
    with pytest.raises(ValueError, match=message):
        CompressedTensorsConfig.from_config(config_with(**bad))


def test_int8_weight_is_stored_as_int8(tiny_checkpoints, tmp_path) -> None:
    path = pack_compressed_tensors(tiny_checkpoints["llama"], tmp_path / "ct", INT8_CHANNEL,
                                   dict(TOKEN, num_bits=8, type="int"), "int-quantized")
    llm = make_llm(path)
    layer = llm.llm_engine.engine_core.executor.worker.model_runner.model.model.layers[0].mlp.gate_up_proj
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.shape == (256, 1)
