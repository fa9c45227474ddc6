"""compressed-tensors pack-quantized W4A16/W8A16: tensors written by the compressed-tensors
package load into a layer whose output equals x @ W.T with W the package's own
decompression (tolerance 1e-4, fp32), whole and split over tensor-parallel ranks; and,
once the compressed-tensors dispatcher is merged, a whole checkpoint through `LLM`."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from ct_checkpoints import ct_compress, ct_scheme, write_ct_checkpoint
from int_group_checkpoints import OneMethodConfig, assert_engine_matches_reference, ct_tensors, quantize
from tiny_models import make_tiny_checkpoint

from pagedllm.distributed.parallel_state import override_tp_state_for_testing
from pagedllm.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from pagedllm.layers.quantization.compressed_tensors_wNa16 import CompressedTensorsWNA16

ATOL = 1e-4
SCHEMES = [(4, 128, True), (4, 32, True), (4, 32, False), (4, None, True), (8, 128, True), (8, 32, False)]
SCHEME_IDS = ["w4-g128-sym", "w4-g32-sym", "w4-g32-asym", "w4-channel", "w8-g128-sym", "w8-g32-asym"]


def make_method(num_bits, group_size, symmetric, actorder=None):
    strategy = "group" if group_size else "channel"
    return OneMethodConfig(lambda: CompressedTensorsWNA16(num_bits, group_size, symmetric, strategy, actorder))


def load(layer, tensors):
    params = dict(layer.named_parameters())
    for name, tensor in tensors.items():
        params[name].weight_loader(params[name], tensor)
    layer.quant_method.process_weights_after_loading(layer)


@pytest.mark.parametrize("num_bits, group_size, symmetric", SCHEMES, ids=SCHEME_IDS)
def test_layer_output_equals_compressed_tensors_decompression(num_bits, group_size, symmetric):
    torch.manual_seed(0)
    weight, x = torch.randn(96, 256), torch.randn(5, 256)
    tensors, dequantized = ct_compress(weight, ct_scheme(num_bits, group_size, symmetric))
    assert tensors["weight_packed"].dtype == torch.int32
    assert tensors["weight_packed"].shape == (96, 256 * num_bits // 32)
    layer = ReplicatedLinear(256, 96, quant_config=make_method(num_bits, group_size, symmetric), prefix="proj")
    load(layer, tensors)
    torch.testing.assert_close(layer(x), x @ dequantized.t(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_bits, group_size, symmetric", SCHEMES[:3], ids=SCHEME_IDS[:3])
def test_column_and_row_parallel_ranks_reassemble_the_full_output(num_bits, group_size, symmetric):
    torch.manual_seed(1)
    weight, x = torch.randn(64, 256), torch.randn(3, 256)
    tensors, dequantized = ct_compress(weight, ct_scheme(num_bits, group_size, symmetric))
    config = make_method(num_bits, group_size, symmetric)
    column, row_sum = [], torch.zeros(3, 64)
    for rank in range(2):
        with override_tp_state_for_testing(rank, 2):
            col_layer = ColumnParallelLinear(256, 64, quant_config=config, prefix="up")
            row_layer = RowParallelLinear(256, 64, reduce_results=False, quant_config=config, prefix="down")
        load(col_layer, tensors)
        load(row_layer, tensors)
        column.append(col_layer(x))
        row_sum += row_layer(x[:, rank * 128:(rank + 1) * 128])
    torch.testing.assert_close(torch.cat(column, -1), x @ dequantized.t(), atol=ATOL, rtol=0)
    torch.testing.assert_close(row_sum, x @ dequantized.t(), atol=ATOL, rtol=0)


def test_actorder_group_g_idx_reorders_rows():
    """weight_g_idx (actorder "group", written by older compressed-tensors): row k's scale is
    column g_idx[k] of weight_scale."""
    torch.manual_seed(2)
    order = torch.randperm(128)
    g_idx = torch.empty(128, dtype=torch.long)
    g_idx[order] = torch.arange(128) // 32
    qt = quantize(torch.randn(48, 128), 4, 32, True, g_idx)
    layer = ReplicatedLinear(128, 48, quant_config=make_method(4, 32, True, "group"), prefix="proj")
    load(layer, ct_tensors(qt, 4, sym=True, with_g_idx=True))
    x = torch.randn(4, 128)
    torch.testing.assert_close(layer(x), x @ qt.dequantized.t(), atol=ATOL, rtol=0)


def test_unsupported_bits_and_strategy_are_value_errors():
    with pytest.raises(ValueError, match="num_bits=3"):
        CompressedTensorsWNA16(3, 128, True, "group", None)
    with pytest.raises(ValueError, match="strategy='tensor'"):
        CompressedTensorsWNA16(4, None, True, "tensor", None)


_HAS_DISPATCHER = importlib.util.find_spec("pagedllm.layers.quantization.compressed_tensors") is not None


@pytest.mark.skipif(not _HAS_DISPATCHER, reason="the compressed-tensors dispatcher comes from the quant-fp8 branch")
@pytest.mark.parametrize(
    "group_size, sizes", [(128, dict(hidden_size=128, intermediate_size=256)), (32, {})], ids=["g128", "g32"]
)
def test_w4a16_checkpoint_matches_dequantized_transformers(tmp_path, group_size, sizes):
    source = make_tiny_checkpoint(tmp_path / "src", "llama", seed=4, **sizes)
    reference = write_ct_checkpoint(source, tmp_path / "ct", ct_scheme(4, group_size, True))
    assert_engine_matches_reference(tmp_path / "ct", reference)
