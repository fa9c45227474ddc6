"""AWQ checkpoints (AutoAWQ GEMM layout), 4 bits with zero points.

On disk, per linear layer (K input features, N output features, G = K / group_size):
  qweight  int32 [K, N / 8]   eight 4-bit values per word along N in AWQ's interleaved order:
                              nibble i of word j holds column 8j + (0, 2, 4, 6, 1, 3, 5, 7)[i]
  qzeros   int32 [G, N / 8]   zero points, same packing (stored as is)
  scales   fp16  [G, N]
W[k, n] = (q[k, n] - zero[k // group_size, n]) * scale[k // group_size, n].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagedllm.layers.quantization.base import (
    LinearMethodBase,
    QuantizationConfig,
    TensorParallelUnits,
    UnquantizedLinearMethod,
)
from pagedllm.layers.quantization.int_group_linear import (
    IntGroupLinearMethod,
    check_input_packing,
    check_output_packing,
    dummy_fill,
    input_groups,
    is_layer_excluded,
    make_param,
)
from pagedllm.layers.quantization.kernels.int_group import IntGroupScheme, pack_int32, unpack_awq

_AWQ_PACK = 8


@dataclass(frozen=True)
class AWQConfig(QuantizationConfig):
    """An AWQ checkpoint's quantization_config."""

    weight_bits: int
    group_size: int
    zero_point: bool = True
    modules_to_not_convert: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.weight_bits != 4:
            raise ValueError(f"AWQ bits={self.weight_bits} is not supported; use 4.")
        if not self.zero_point:
            raise ValueError("AWQ zero_point=false is not supported; use a checkpoint with zero_point=true.")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"AWQ group_size={self.group_size} is invalid; use -1 or a positive size.")

    @property
    def pack_factor(self) -> int:
        """Values per int32 word (as vLLM's config names it)."""
        return 32 // self.weight_bits

    def get_name(self) -> str:
        return "awq"

    def tensor_parallel_units(self) -> TensorParallelUnits | None:
        return None if self.group_size == -1 else TensorParallelUnits(self.group_size, 1, "group_size")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AWQConfig:
        bits = config.get("bits", config.get("w_bit"))
        group_size = config.get("group_size", config.get("q_group_size"))
        if bits is None or group_size is None:
            raise ValueError(
                "quantization='awq' needs an AWQ checkpoint: its config.json quantization_config "
                "must give bits (or w_bit) and group_size (or q_group_size)."
            )
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version={version!r} is not supported; use a checkpoint in the 'gemm' layout.")
        return cls(
            weight_bits=int(bits),
            group_size=int(group_size),
            zero_point=bool(config.get("zero_point", True)),
            modules_to_not_convert=tuple(config.get("modules_to_not_convert") or ()),
        )

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase:
        if is_layer_excluded(prefix, self.modules_to_not_convert):
            return UnquantizedLinearMethod()
        return AWQLinearMethod(self)


class AWQLinearMethod(IntGroupLinearMethod):
    def __init__(self, config: AWQConfig) -> None:
        self.config = config
        self.scheme = IntGroupScheme(4, config.group_size, act_order=False)

    def create_weights(
        self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
        input_size: int, output_size: int, params_dtype: torch.dtype,
    ) -> None:
        check_input_packing(layer, input_size_per_partition, self.scheme.pack_factor, "AWQ")
        check_output_packing(layer, output_partition_sizes, _AWQ_PACK)
        groups, split = input_groups(self.scheme, layer, input_size_per_partition, input_size, False)
        group_dim = 0 if split else None
        num_outputs = sum(output_partition_sizes)
        packed = {"output_dim": 1, "packed_dim": 1, "pack_factor": _AWQ_PACK}
        make_param(layer, "qweight", (input_size_per_partition, num_outputs // _AWQ_PACK), torch.int32,
                   {"input_dim": 0, **packed})
        make_param(layer, "qzeros", (groups, num_outputs // _AWQ_PACK), torch.int32,
                   {"input_dim": group_dim, **packed})
        make_param(layer, "scales", (groups, num_outputs), params_dtype,
                   {"input_dim": group_dim, "output_dim": 1})

    def to_internal(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        qweight = pack_int32(unpack_awq(layer.qweight.data), 4, dim=0)
        zeros = unpack_awq(layer.qzeros.data)
        scales = layer.scales.data
        del layer.qweight, layer.qzeros
        return qweight, scales, zeros, None

    def dummy_init(self, layer: nn.Module, generator: torch.Generator) -> None:
        dummy_fill(layer.qweight, generator)
        dummy_fill(layer.qzeros, generator)
        dummy_fill(layer.scales, generator, scale=2e-3 / 16)
