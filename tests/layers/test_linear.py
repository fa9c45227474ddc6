"""Tensor-parallel slicing of the linear layers, checked without processes: each rank's layer is
built under a fake rank/size, loaded from the full checkpoint tensor, and the per-rank outputs
are reassembled by hand (concatenated or summed) and compared with the plain full matmul.
Tolerance 1e-5 (fp32, the same products summed in a different order)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pagedllm.distributed.parallel_state import get_tp_rank, get_tp_size, override_tp_state_for_testing
from pagedllm.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)

ATOL = 1e-5


def per_rank(tp_size: int, build: Callable[[], torch.nn.Module]) -> list[torch.nn.Module]:
    layers = []
    for rank in range(tp_size):
        with override_tp_state_for_testing(rank, tp_size):
            layers.append(build())
    return layers


def load(layer: torch.nn.Module, name: str, tensor: torch.Tensor, shard_id: object = None) -> None:
    param = getattr(layer, name)
    if shard_id is None:
        param.weight_loader(param, tensor)
    else:
        param.weight_loader(param, tensor, shard_id)


def test_single_process_defaults_to_rank_0_of_1() -> None:
    assert (get_tp_rank(), get_tp_size()) == (0, 1)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_column_parallel_ranks_concatenate_to_full_output(tp_size: int) -> None:
    weight, bias, x = torch.randn(8, 6), torch.randn(8), torch.randn(3, 6)
    layers = per_rank(tp_size, lambda: ColumnParallelLinear(6, 8, bias=True))
    for layer in layers:
        load(layer, "weight", weight)
        load(layer, "bias", bias)
    out = torch.cat([layer(x) for layer in layers], dim=-1)
    torch.testing.assert_close(out, x @ weight.T + bias, atol=ATOL, rtol=0)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_merged_column_parallel_holds_each_parts_rank_slice(tp_size: int) -> None:
    gate, up, x = torch.randn(8, 6), torch.randn(8, 6), torch.randn(3, 6)
    separate = per_rank(tp_size, lambda: MergedColumnParallelLinear(6, [8, 8]))
    fused = per_rank(tp_size, lambda: MergedColumnParallelLinear(6, [8, 8]))
    for layer in separate:
        load(layer, "weight", gate, 0)
        load(layer, "weight", up, 1)
    for layer in fused:
        load(layer, "weight", torch.cat([gate, up]))  # a checkpoint that stores them fused
    for layers in (separate, fused):
        outs = [layer(x) for layer in layers]
        half = 8 // tp_size
        torch.testing.assert_close(torch.cat([o[:, :half] for o in outs], -1), x @ gate.T, atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.cat([o[:, half:] for o in outs], -1), x @ up.T, atol=ATOL, rtol=0)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_qkv_ranks_hold_their_query_heads_and_the_kv_head_those_use(tp_size: int) -> None:
    head, heads, kv_heads, hidden = 2, 4, 2, 6
    wq, wk, wv = torch.randn(heads * head, hidden), torch.randn(kv_heads * head, hidden), torch.randn(kv_heads * head, hidden)
    x = torch.randn(3, hidden)
    layers = per_rank(tp_size, lambda: QKVParallelLinear(hidden, head, heads, kv_heads, prefix="qkv"))
    group = heads // kv_heads
    for rank, layer in enumerate(layers):
        load(layer, "weight", wq, "q")
        load(layer, "weight", wk, "k")
        load(layer, "weight", wv, "v")
        q, k, v = layer(x).split([layer.num_heads * head, layer.num_kv_heads * head, layer.num_kv_heads * head], -1)
        q_heads = list(range(rank * layer.num_heads, (rank + 1) * layer.num_heads))
        kv_used = sorted({h // group for h in q_heads})
        assert len(kv_used) == layer.num_kv_heads
        rows_q = torch.cat([torch.arange(h * head, (h + 1) * head) for h in q_heads])
        rows_kv = torch.cat([torch.arange(h * head, (h + 1) * head) for h in kv_used])
        torch.testing.assert_close(q, x @ wq[rows_q].T, atol=ATOL, rtol=0)
        torch.testing.assert_close(k, x @ wk[rows_kv].T, atol=ATOL, rtol=0)
        torch.testing.assert_close(v, x @ wv[rows_kv].T, atol=ATOL, rtol=0)


def test_qkv_rejects_head_counts_that_do_not_split() -> None:
    with override_tp_state_for_testing(0, 4), pytest.raises(
        ValueError, match=r"num_attention_heads \(14\) must be divisible by tensor_parallel_size \(4\)"
    ):
        QKVParallelLinear(64, 4, 14, 2)
    with override_tp_state_for_testing(0, 2), pytest.raises(ValueError, match=r"num_key_value_heads \(3\)"):
        QKVParallelLinear(64, 4, 6, 3)
    with override_tp_state_for_testing(0, 4), pytest.raises(ValueError, match=r"num_key_value_heads \(3\)"):
        QKVParallelLinear(64, 4, 12, 3)


@pytest.mark.parametrize("input_is_parallel", [True, False])
@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_row_parallel_partial_outputs_sum_to_full_output_with_bias_once(tp_size: int, input_is_parallel: bool) -> None:
    weight, bias, x = torch.randn(5, 8), torch.randn(5), torch.randn(3, 8)
    layers = per_rank(
        tp_size,
        lambda: RowParallelLinear(8, 5, bias=True, input_is_parallel=input_is_parallel, reduce_results=False),
    )
    total = torch.zeros(3, 5)
    for rank, layer in enumerate(layers):
        load(layer, "weight", weight)
        load(layer, "bias", bias)
        width = 8 // tp_size
        total += layer(x[:, rank * width : (rank + 1) * width] if input_is_parallel else x)
    torch.testing.assert_close(total, x @ weight.T + bias, atol=ATOL, rtol=0)


def test_weight_loader_reads_only_its_slice_from_a_lazy_safetensors_slice(tmp_path) -> None:
    weight = torch.randn(8, 6)
    save_file({"w": weight}, str(tmp_path / "w.safetensors"))
    layers = per_rank(2, lambda: ColumnParallelLinear(6, 8))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        for layer in layers:
            load(layer, "weight", f.get_slice("w"))
    torch.testing.assert_close(torch.cat([layer.weight for layer in layers]), weight)


def test_shape_mismatch_names_the_layer() -> None:
    layer = ReplicatedLinear(6, 8, prefix="model.layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*\(8, 7\)"):
        load(layer, "weight", torch.randn(8, 7))


class _RecordingMethod:
    """Stands in for a quantization method with a fused kernel: records the epilogue asked for."""

    def __init__(self, method) -> None:
        self.method = method
        self.epilogues: list[object] = []

    def apply_with_epilogue(self, layer, x, bias, epilogue):
        self.epilogues.append(epilogue)
        return self.method.apply(layer, x, bias)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_qkv_asks_its_method_for_the_rope_of_its_own_heads(tp_size: int) -> None:
    """forward_rotated hands the method one RopeEpilogue over this rank's q and k heads (and
    on the CPU, where the method has no fused kernel, returns None: the caller rotates)."""
    from pagedllm.layers.ops.epilogue import RopeEpilogue
    from pagedllm.layers.rotary_embedding import get_rope

    layers = per_rank(tp_size, lambda: QKVParallelLinear(16, 8, total_num_heads=4, total_num_kv_heads=2))
    x, positions = torch.randn(3, 16), torch.tensor([0, 5, 9])
    rope = get_rope(8, 32, {"rope_type": "default", "rope_theta": 100.0})
    assert layers[0].forward_rotated(x, rope, positions) is None
    for layer in layers:
        layer.quant_method = _RecordingMethod(layer.quant_method)
        layer.forward_rotated(x, rope, positions)
        (epilogue,) = layer.quant_method.epilogues
        assert isinstance(epilogue, RopeEpilogue) and epilogue.head_size == 8
        assert epilogue.rotated_columns == (4 // tp_size + 2 // tp_size) * 8
        assert epilogue.positions is positions and epilogue.cos_cache is rope.cos_cache
    partial = get_rope(8, 32, {"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5})
    assert layers[0].forward_rotated(x, partial, positions) is None
    assert layers[0].forward_rotated(x, rope, torch.zeros(3, 3, dtype=torch.long)) is None  # M-RoPE rows
    assert len(layers[0].quant_method.epilogues) == 1


def test_gate_up_asks_its_method_for_silu_and_mul_only_with_equal_parts() -> None:
    from pagedllm.layers.ops.epilogue import SiluAndMulEpilogue

    layer = MergedColumnParallelLinear(6, [8, 8])
    assert layer.forward_silu_and_mul(torch.randn(2, 6)) is None
    layer.quant_method = _RecordingMethod(layer.quant_method)
    layer.forward_silu_and_mul(torch.randn(2, 6))
    assert layer.quant_method.epilogues == [SiluAndMulEpilogue()]
    unequal = MergedColumnParallelLinear(6, [8, 4])
    unequal.quant_method = _RecordingMethod(unequal.quant_method)
    assert unequal.forward_silu_and_mul(torch.randn(2, 6)) is None and not unequal.quant_method.epilogues
