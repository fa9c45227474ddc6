"""compressed-tensors `pack-quantized` weights with 16-bit activations (W4A16, W8A16).

On disk, per linear layer (N output features, K input features, G groups):
  weight_packed      int32 [N, K / pack]   values + 2**(bits-1) packed along K, value i of a
                                           word at bits i*bits
  weight_scale       [N, G]
  weight_shape       int   [2]             the unpacked [N, K]
  weight_zero_point  int32 [N / pack, G]   (asymmetric only) zero points + 2**(bits-1),
                                           packed along N
  weight_g_idx       int32 [K]             (actorder "group" only) group of each input row
W[n, k] = (q[n, k] - zero[n, g(k)]) * scale[n, g(k)] in signed integers; the unsigned offsets
cancel. The `compressed-tensors` config dispatcher builds this method per layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.layers.quantization.base import LoadedWeight, copy_loaded_weight
from pagedllm.layers.quantization.int_group_linear import (
    IntGroupLinearMethod,
    check_input_packing,
    check_output_packing,
    dummy_fill,
    dummy_g_idx,
    input_groups,
    make_g_idx_param,
    make_param,
)
from pagedllm.layers.quantization.kernels.int_group import IntGroupScheme, check_bits, pack_int32, unpack_int32

_STRATEGIES = ("group", "channel")
_ACTORDERS = (None, "group", "weight", "static", "dynamic")


class CompressedTensorsWNA16(IntGroupLinearMethod):
    def __init__(
        self, num_bits: int, group_size: int | None, symmetric: bool, strategy: str,
        actorder: str | None = None,
    ) -> None:
        check_bits(num_bits, "compressed-tensors pack-quantized num_bits")
        if strategy not in _STRATEGIES:
            raise ValueError(
                f"compressed-tensors pack-quantized strategy={strategy!r} is not supported; use one of {_STRATEGIES}."
            )
        if strategy == "group" and (group_size is None or group_size <= 0):
            raise ValueError(f"compressed-tensors strategy='group' needs a positive group_size, got {group_size!r}.")
        if actorder not in _ACTORDERS:
            raise ValueError(f"compressed-tensors actorder={actorder!r} is not supported; use one of {_ACTORDERS}.")
        self.symmetric = symmetric
        # Only actorder "group" stores weight_g_idx; "weight" reorders while quantizing only.
        self.has_g_idx = actorder in ("group", "dynamic") and strategy == "group"
        self.scheme = IntGroupScheme(num_bits, group_size if strategy == "group" else -1, self.has_g_idx)

    def create_weights(
        self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
        input_size: int, output_size: int, params_dtype: torch.dtype,
    ) -> None:
        pack = self.scheme.pack_factor
        check_input_packing(layer, input_size_per_partition, pack, "pack-quantized")
        groups, split = input_groups(self.scheme, layer, input_size_per_partition, input_size, True)
        group_dim = 1 if split else None
        num_outputs = sum(output_partition_sizes)
        make_param(layer, "weight_packed", (num_outputs, input_size_per_partition // pack), torch.int32,
                   {"output_dim": 0, "input_dim": 1, "packed_dim": 1, "pack_factor": pack})
        make_param(layer, "weight_scale", (num_outputs, groups), params_dtype,
                   {"output_dim": 0, "input_dim": group_dim})
        shape = make_param(layer, "weight_shape", (2,), torch.int64, {})
        shape.weight_loader = _load_weight_shape
        if not self.symmetric:
            check_output_packing(layer, output_partition_sizes, pack)
            make_param(layer, "weight_zero_point", (num_outputs // pack, groups), torch.int32,
                       {"output_dim": 0, "input_dim": group_dim, "packed_dim": 0, "pack_factor": pack})
        if self.has_g_idx:
            make_g_idx_param(layer, "weight_g_idx", len(output_partition_sizes), input_size_per_partition)

    def to_internal(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        bits = self.scheme.bits
        values = unpack_int32(layer.weight_packed.data, bits, dim=1)
        qweight = pack_int32(values.t(), bits, dim=0)
        scales = layer.weight_scale.data.t()
        if self.symmetric:
            zeros = torch.full_like(scales, float(1 << (bits - 1)))
        else:
            zeros = unpack_int32(layer.weight_zero_point.data, bits, dim=0).t()
            del layer.weight_zero_point
        g_idx = layer.weight_g_idx.data if self.has_g_idx else None
        if self.has_g_idx:
            del layer.weight_g_idx
        del layer.weight_packed, layer.weight_scale, layer.weight_shape
        return qweight, scales, zeros, g_idx

    def dummy_init(self, layer: nn.Module, generator: torch.Generator) -> None:
        dummy_fill(layer.weight_packed, generator)
        dummy_fill(layer.weight_scale, generator, scale=2e-3 / 2**self.scheme.bits)
        layer.weight_shape.data.copy_(torch.tensor([sum(layer.output_partition_sizes), layer.input_size]))
        if not self.symmetric:
            dummy_fill(layer.weight_zero_point, generator)
        if self.has_g_idx:
            dummy_g_idx(layer, layer.weight_g_idx, self.scheme.group_size)


def _load_weight_shape(param: nn.Parameter, loaded: LoadedWeight, shard_id: Any = None) -> None:
    # The unpacked shape is implied by the layer; kept only so the checkpoint tensor has a home.
    copy_loaded_weight(param.data, loaded, "weight_shape")
