"""Which tensor_parallel_size a model splits into, checked from config.json before any worker
starts: heads and MLP width, and the units a quantized checkpoint adds (whole groups in the
row-parallel inputs, whole blocks for block-wise fp8). The sizes an error proposes work."""

from __future__ import annotations

import pytest
import transformers

from pagedllm.engine.tensor_parallel_split import check_tensor_parallel_split


def _config(quantization_config: dict | None = None, **sizes: int) -> transformers.LlamaConfig:
    fields = dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=4)
    config = transformers.LlamaConfig(**{**fields, **sizes})
    config.architectures = ["LlamaForCausalLM"]
    if quantization_config is not None:
        config.quantization_config = quantization_config
    return config


def test_heads_and_width_decide_without_quantization():
    check_tensor_parallel_split(_config(), 2)
    check_tensor_parallel_split(_config(), 4)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\).*not divisible by tensor_parallel_size \(3\).*\[1, 2, 4\]"):
        check_tensor_parallel_split(_config(), 3)


@pytest.mark.parametrize("quantization_config", [
    {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
                                           "symmetric": True}}}},
])
def test_groups_never_straddle_ranks_and_the_proposed_sizes_work(quantization_config):
    # down_proj's input, 384 rows, in groups of 128: two ranks would hold 192 rows each.
    config = _config(quantization_config)
    with pytest.raises(ValueError, match=r"down_proj's input \(384\).*192 rows per rank.*group_size \(128\).*\[1\]"):
        check_tensor_parallel_split(config, 2)
    check_tensor_parallel_split(_config(quantization_config, intermediate_size=512), 2)


def test_act_order_and_per_channel_checkpoints_split_anywhere_the_heads_allow():
    check_tensor_parallel_split(_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}), 2)
    check_tensor_parallel_split(_config({"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": False}), 2)


def test_block_fp8_needs_whole_blocks_on_both_sides():
    block = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    with pytest.raises(ValueError, match=r"weight_block_size \(128\)"):
        check_tensor_parallel_split(_config(block), 2)
    check_tensor_parallel_split(_config(block, intermediate_size=512), 2)
    with pytest.raises(ValueError, match=r"o_proj's input \(256\).*64 rows per rank.*\[1, 2\]"):
        check_tensor_parallel_split(_config(block, intermediate_size=512), 4)
    # The output side: q_proj's 512 columns over four ranks are 128 each, one block of 128
    # rows but half a block of 256.
    wide = _config(block, hidden_size=512, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=4)
    check_tensor_parallel_split(wide, 4)
    narrow_blocks = {**block, "weight_block_size": [256, 128]}
    with pytest.raises(ValueError, match=r"q_proj's output \(512\).*128 columns per rank.*weight_block_size \(256\)"):
        check_tensor_parallel_split(_config(narrow_blocks, hidden_size=512, intermediate_size=1024), 4)


def test_one_rank_is_always_proposed_even_with_a_partial_last_group():
    # 192 rows in groups of 128: one rank holds the partial group whole, two would split it.
    config = _config({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
                     intermediate_size=192)
    with pytest.raises(ValueError, match=r"use tensor_parallel_size in \[1\]"):
        check_tensor_parallel_split(config, 2)
