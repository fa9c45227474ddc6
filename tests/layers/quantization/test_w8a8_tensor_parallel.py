"""Quantized weights and scales split across tensor-parallel ranks, without processes: each
rank's layer is built under a fake rank/size and loaded from the full checkpoint tensors; its
dequantized weight must equal its rows (column-parallel) or columns (row-parallel) of the full
dequantized weight exactly (the same fp8/int8 values times the same scales)."""

from __future__ import annotations

import pytest
import torch
from quant_reference import block_absmax, expand_blocks

from pagedllm.distributed.parallel_state import override_tp_state_for_testing
from pagedllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedllm.layers.quantization.compressed_tensors import CompressedTensorsConfig
from pagedllm.layers.quantization.fp8 import Fp8Config

FP8 = torch.float8_e4m3fn
HIDDEN, HEAD, HEADS, KV_HEADS = 64, 16, 4, 2


def build(tp_size: int, make):
    layers = []
    for rank in range(tp_size):
        with override_tp_state_for_testing(rank, tp_size):
            layers.append(make())
    return layers


def load(layer, name, tensor, shard_id=None) -> None:
    param = getattr(layer, name)
    param.weight_loader(param, tensor) if shard_id is None else param.weight_loader(param, tensor, shard_id)


def dequantized(layer) -> torch.Tensor:
    layer.quant_method.process_weights_after_loading(layer)
    return layer.quant_method.dequantized_weight(layer, torch.float32)


def per_tensor_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight.abs().max() / 448
    return (weight / scale).to(FP8), scale


def qkv_rows(full: dict[str, torch.Tensor], rank: int, tp_size: int) -> torch.Tensor:
    parts = []
    for shard in "qkv":
        size = full[shard].shape[0] // tp_size
        parts.append(full[shard][rank * size : (rank + 1) * size])
    return torch.cat(parts)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_per_tensor_scales_of_fused_qkv_stay_per_shard(tp_size: int) -> None:
    torch.manual_seed(0)
    config = Fp8Config.from_config({"quant_method": "fp8", "activation_scheme": "dynamic"})
    sizes = {"q": HEADS * HEAD, "k": KV_HEADS * HEAD, "v": KV_HEADS * HEAD}
    layers = build(tp_size, lambda: QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, quant_config=config, prefix="qkv"))
    full = {}
    for shard, rows in sizes.items():
        # Very different ranges per shard: one shared scale would lose the small one's precision.
        q, scale = per_tensor_fp8(torch.randn(rows, HIDDEN) * {"q": 1.0, "k": 100.0, "v": 0.01}[shard])
        full[shard] = q.float() * scale
        for layer in layers:
            load(layer, "weight", q, shard)
            load(layer, "weight_scale", scale.reshape(()), shard)
    for rank, layer in enumerate(layers):
        assert torch.equal(dequantized(layer), qkv_rows(full, rank, tp_size))


def test_dynamic_fp8_quantizes_each_ranks_rows_per_channel() -> None:
    torch.manual_seed(0)
    gate, up = torch.randn(128, HIDDEN), torch.randn(128, HIDDEN) * 5
    layers = build(2, lambda: MergedColumnParallelLinear(HIDDEN, [128, 128], quant_config=Fp8Config.from_config({})))
    for layer in layers:
        load(layer, "weight", gate, 0)
        assert hasattr(layer, "_staging_weight")  # waits for the other shard
        load(layer, "weight", up, 1)
        assert not hasattr(layer, "_staging_weight")  # quantized and freed
    for rank, layer in enumerate(layers):
        rows = torch.cat([gate[rank * 64 : (rank + 1) * 64], up[rank * 64 : (rank + 1) * 64]])
        scale = rows.abs().amax(1, keepdim=True) / 448
        assert layer.weight.dtype == FP8
        assert torch.equal(dequantized(layer), (rows / scale).to(FP8).float() * scale)


def block_config(block: tuple[int, int]) -> Fp8Config:
    return Fp8Config.from_config({"quant_method": "fp8", "weight_block_size": list(block)})


def block_quantized(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    scale_inv = block_absmax(weight, block) / 448
    return (weight / expand_blocks(scale_inv, block, weight.shape)).to(FP8), scale_inv


@pytest.mark.parametrize("tp_size", [1, 2])
def test_block_scales_follow_both_dims_of_a_row_parallel_split(tp_size: int) -> None:
    torch.manual_seed(0)
    block = (16, 32)
    weight, scale_inv = block_quantized(torch.randn(HIDDEN, 128), block)
    full = weight.float() * expand_blocks(scale_inv, block, weight.shape)
    layers = build(tp_size, lambda: RowParallelLinear(128, HIDDEN, quant_config=block_config(block)))
    for layer in layers:
        load(layer, "weight", weight)
        load(layer, "weight_scale_inv", scale_inv)
    width = 128 // tp_size
    for rank, layer in enumerate(layers):
        assert torch.equal(dequantized(layer), full[:, rank * width : (rank + 1) * width])


def test_block_scales_of_fused_qkv_split_by_shard() -> None:
    torch.manual_seed(0)
    block = (16, 32)
    sizes = {"q": HEADS * HEAD, "k": KV_HEADS * HEAD, "v": KV_HEADS * HEAD}
    layers = build(2, lambda: QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, quant_config=block_config(block)))
    full = {}
    for shard, rows in sizes.items():
        weight, scale_inv = block_quantized(torch.randn(rows, HIDDEN), block)
        full[shard] = weight.float() * expand_blocks(scale_inv, block, weight.shape)
        for layer in layers:
            load(layer, "weight", weight, shard)
            load(layer, "weight_scale_inv", scale_inv, shard)
    for rank, layer in enumerate(layers):
        assert torch.equal(dequantized(layer), qkv_rows(full, rank, 2))


def test_block_that_would_straddle_ranks_is_a_value_error() -> None:
    # k has 32 rows: 16 per rank, half of a 32-row block.
    with pytest.raises(ValueError, match="straddle ranks"):
        build(2, lambda: QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, quant_config=block_config((32, 32))))
    with pytest.raises(ValueError, match="straddle ranks"):
        build(2, lambda: RowParallelLinear(HIDDEN, HIDDEN, quant_config=block_config((16, 64))))


def test_channel_scales_split_with_int8_rows() -> None:
    torch.manual_seed(0)
    config = CompressedTensorsConfig.from_config({
        "quant_method": "compressed-tensors", "format": "int-quantized",
        "config_groups": {"g": {"targets": ["Linear"],
                                "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
                                "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}},
    })
    gate, up = torch.randn(128, HIDDEN), torch.randn(128, HIDDEN)
    layers = build(2, lambda: MergedColumnParallelLinear(HIDDEN, [128, 128], quant_config=config))
    full = []
    for shard, weight in enumerate((gate, up)):
        scale = weight.abs().amax(1, keepdim=True) / 127
        q = torch.round(weight / scale).to(torch.int8)
        full.append(q.float() * scale)
        for layer in layers:
            load(layer, "weight", q, shard)
            load(layer, "weight_scale", scale, shard)
    for rank, layer in enumerate(layers):
        expected = torch.cat([part[rank * 64 : (rank + 1) * 64] for part in full])
        assert torch.equal(dequantized(layer), expected)
