"""Tensor-parallel loading of GPTQ, AWQ and compressed-tensors W4A16 weights, without
processes (as tests/layers/test_linear.py): each rank's layer is built under a fake rank/size,
loaded from the full checkpoint tensors, post-processed, and its output compared with the
matching slice (column-parallel) or summed (row-parallel) against x @ W_dequantized.T.
Tolerance 1e-4 (fp32, the same products summed in another order)."""

from __future__ import annotations

import pytest
import torch
from int_group_checkpoints import OneMethodConfig, checkpoint_tensors, quantize

from pagedllm.distributed.parallel_state import override_tp_state_for_testing
from pagedllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedllm.layers.quantization.awq import AWQConfig
from pagedllm.layers.quantization.compressed_tensors_wNa16 import CompressedTensorsWNA16
from pagedllm.layers.quantization.gptq import GPTQConfig

ATOL = 1e-4


def make_config(method: str, sym: bool, group_size: int, act_order: bool):
    if method == "gptq":
        return GPTQConfig.from_config({"bits": 4, "group_size": group_size, "desc_act": act_order, "sym": sym})
    if method == "awq":
        return AWQConfig.from_config({"bits": 4, "group_size": group_size, "zero_point": True})
    actorder = "group" if act_order else None
    return OneMethodConfig(lambda: CompressedTensorsWNA16(4, group_size, sym, "group", actorder))


def random_g_idx(num_rows: int, group_size: int, seed: int) -> torch.Tensor:
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(num_rows, dtype=torch.long)
    g_idx[order] = torch.arange(num_rows) // group_size
    return g_idx


def load_part(layer: torch.nn.Module, tensors: dict[str, torch.Tensor], shard_id: object = None) -> None:
    params = dict(layer.named_parameters())
    for name, tensor in tensors.items():
        param = params[name]
        if shard_id is None:
            param.weight_loader(param, tensor)
        else:
            param.weight_loader(param, tensor, shard_id)


CASES = [
    ("gptq", True, False), ("gptq", False, False), ("gptq", False, True),
    ("awq", False, False), ("ct", True, False), ("ct", False, False), ("ct", True, True),
]
IDS = ["gptq-sym", "gptq-asym", "gptq-desc-act", "awq", "ct-sym", "ct-asym", "ct-actorder"]


@pytest.mark.parametrize("method, sym, act_order", CASES, ids=IDS)
@pytest.mark.parametrize("tp_size", [1, 2])
def test_merged_column_parallel_ranks_hold_their_slices(method, sym, act_order, tp_size):
    torch.manual_seed(0)
    input_size, sizes, group_size = 64, [32, 48], 16
    weights = [torch.randn(n, input_size) for n in sizes]
    quantized = [
        quantize(w, 4, group_size, sym, random_g_idx(input_size, group_size, i) if act_order else None)
        for i, w in enumerate(weights)
    ]
    x = torch.randn(5, input_size)
    config = make_config(method, sym, group_size, act_order)
    for rank in range(tp_size):
        with override_tp_state_for_testing(rank, tp_size):
            layer = MergedColumnParallelLinear(input_size, sizes, quant_config=config, prefix="mlp.gate_up_proj")
        for part, qt in enumerate(quantized):
            load_part(layer, checkpoint_tensors(method, qt, 4, sym, act_order), part)
        layer.quant_method.process_weights_after_loading(layer)
        expected = torch.cat([
            (x @ qt.dequantized.t()).chunk(tp_size, dim=-1)[rank] for qt in quantized
        ], dim=-1)
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method, sym, act_order", CASES, ids=IDS)
def test_qkv_layer_loads_each_part_with_kv_heads_replicated(method, sym, act_order):
    """tp=4 with 2 kv heads: each pair of ranks shares one k/v head."""
    torch.manual_seed(1)
    hidden, head, group_size = 64, 8, 16
    sizes = {"q": 4 * head * 2, "k": 2 * head, "v": 2 * head}
    qts = {
        part: quantize(torch.randn(n, hidden), 4, group_size, sym,
                       random_g_idx(hidden, group_size, i) if act_order else None)
        for i, (part, n) in enumerate(sizes.items())
    }
    x = torch.randn(3, hidden)
    config = make_config(method, sym, group_size, act_order)
    full = {part: x @ qt.dequantized.t() for part, qt in qts.items()}
    for rank in range(4):
        with override_tp_state_for_testing(rank, 4):
            layer = QKVParallelLinear(hidden, head, 8, 2, quant_config=config, prefix="attn.qkv_proj")
        for part, qt in qts.items():
            load_part(layer, checkpoint_tensors(method, qt, 4, sym, act_order), part)
        layer.quant_method.process_weights_after_loading(layer)
        expected = torch.cat([full["q"].chunk(4, -1)[rank], full["k"].chunk(2, -1)[rank // 2],
                              full["v"].chunk(2, -1)[rank // 2]], dim=-1)
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method, sym, act_order", CASES, ids=IDS)
@pytest.mark.parametrize("tp_size", [2, 4])
def test_row_parallel_partial_outputs_sum_to_full(method, sym, act_order, tp_size):
    torch.manual_seed(2)
    input_size, output_size, group_size = 128, 32, 16
    qt = quantize(torch.randn(output_size, input_size), 4, group_size, sym,
                  random_g_idx(input_size, group_size, 3) if act_order else None)
    tensors = checkpoint_tensors(method, qt, 4, sym, act_order)
    x = torch.randn(4, input_size)
    config = make_config(method, sym, group_size, act_order)
    total = torch.zeros(4, output_size)
    for rank in range(tp_size):
        with override_tp_state_for_testing(rank, tp_size):
            layer = RowParallelLinear(input_size, output_size, reduce_results=False, quant_config=config,
                                      prefix="mlp.down_proj")
        load_part(layer, tensors)
        layer.quant_method.process_weights_after_loading(layer)
        size = input_size // tp_size
        total += layer(x[:, rank * size:(rank + 1) * size])
    torch.testing.assert_close(total, x @ qt.dequantized.t(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["gptq", "awq", "ct"])
def test_row_parallel_split_inside_a_group_is_a_value_error(method):
    config = make_config(method, True, 128, False)
    with override_tp_state_for_testing(0, 4), pytest.raises(ValueError) as error:
        RowParallelLinear(256, 64, quant_config=config, prefix="mlp.down_proj")
    message = str(error.value)
    assert "group_size=128" in message and "64 rows per rank" in message
    assert "tensor_parallel_size in [1, 2]" in message
