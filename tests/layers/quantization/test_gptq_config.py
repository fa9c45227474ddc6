"""GPTQ quantization_config parsing and the per-layer choice of method: exclusion lists,
GPTQModel's `dynamic` rules, checkpoint_format v1/v2 zero points, and bad values."""

from __future__ import annotations

import pytest
import torch
from int_group_checkpoints import gptq_tensors, quantize

from pagedllm.layers.linear import MergedColumnParallelLinear, ReplicatedLinear
from pagedllm.layers.quantization.base import UnquantizedLinearMethod
from pagedllm.layers.quantization.gptq import GPTQConfig, GPTQLinearMethod

BASE = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}


def test_modules_to_not_convert_matches_checkpoint_names_of_fused_layers():
    config = GPTQConfig.from_config({**BASE, "modules_to_not_convert": ["mlp.gate_proj", "mlp.up_proj"]})
    assert isinstance(config.get_linear_method(None, "model.layers.0.mlp.gate_up_proj"), UnquantizedLinearMethod)
    assert isinstance(config.get_linear_method(None, "model.layers.0.mlp.down_proj"), GPTQLinearMethod)


def test_exclusions_match_whole_module_names_not_prefixes_of_them():
    config = GPTQConfig.from_config({**BASE, "modules_to_not_convert": ["mlp.gate", "lm_head"]})
    assert isinstance(config.get_linear_method(None, "model.layers.0.mlp.gate_up_proj"), GPTQLinearMethod)
    assert isinstance(config.get_linear_method(None, "model.layers.0.mlp.gate"), UnquantizedLinearMethod)


def test_excluding_only_part_of_a_fused_layer_is_a_value_error():
    config = GPTQConfig.from_config({**BASE, "modules_to_not_convert": ["q_proj"]})
    with pytest.raises(ValueError, match="fused layer model.layers.0.self_attn.qkv_proj"):
        config.get_linear_method(None, "model.layers.0.self_attn.qkv_proj")


def test_dynamic_rules_exclude_and_override_per_module():
    config = GPTQConfig.from_config({
        **BASE, "dynamic": {r"-:model\.layers\.0\..*": {}, r"+:.*down_proj": {"bits": 8, "group_size": 64}},
    })
    assert isinstance(config.get_linear_method(None, "model.layers.0.mlp.down_proj"), UnquantizedLinearMethod)
    method = config.get_linear_method(None, "model.layers.1.mlp.down_proj")
    assert (method.scheme.bits, method.scheme.group_size) == (8, 64)
    assert config.get_linear_method(None, "model.layers.1.mlp.gate_up_proj").scheme.bits == 4


@pytest.mark.parametrize("format_key", ["checkpoint_format", "format"])
@pytest.mark.parametrize("checkpoint_format, v1", [("gptq", True), ("gptq_v2", False)])
def test_v1_stores_zero_minus_one_and_v2_stores_the_zero(checkpoint_format, v1, format_key):
    torch.manual_seed(0)
    qt = quantize(torch.randn(32, 64), 4, 32, sym=False)
    config = GPTQConfig.from_config({**BASE, "sym": False, format_key: checkpoint_format})
    layer = ReplicatedLinear(64, 32, quant_config=config, prefix="proj")
    params = dict(layer.named_parameters())
    for name, tensor in gptq_tensors(qt, 4, v1=v1).items():
        params[name].weight_loader(params[name], tensor)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ qt.dequantized.t(), atol=1e-4, rtol=0)


def test_v1_zero_point_of_zero_stored_as_all_ones_reads_as_zero():
    """Groups of only positive weights have zero point 0; v1 stores 0 - 1 wrapped to 2**bits - 1."""
    torch.manual_seed(1)
    qt = quantize(torch.rand(32, 64) + 0.1, 4, 32, sym=False)
    assert bool((qt.zeros == 0).all())
    assert bool((gptq_tensors(qt, 4)["qzeros"] == -1).all())  # every nibble 0xF
    config = GPTQConfig.from_config({**BASE, "sym": False})
    layer = ReplicatedLinear(64, 32, quant_config=config, prefix="proj")
    params = dict(layer.named_parameters())
    for name, tensor in gptq_tensors(qt, 4).items():
        params[name].weight_loader(params[name], tensor)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ qt.dequantized.t(), atol=1e-4, rtol=0)


def test_fused_part_sizes_must_be_multiples_of_the_packing():
    config = GPTQConfig.from_config(BASE)
    with pytest.raises(ValueError, match="multiple of the 8 values packed"):
        MergedColumnParallelLinear(64, [12, 12], quant_config=config, prefix="mlp.gate_up_proj")


@pytest.mark.parametrize(
    "overrides, message",
    [({"bits": 2}, "bits=2"), ({"group_size": 0}, "group_size=0"), ({"checkpoint_format": "marlin"}, "marlin"),
     ({"lm_head": True}, "lm_head")],
)
def test_bad_values_are_value_errors_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTQConfig.from_config({**BASE, **overrides})
