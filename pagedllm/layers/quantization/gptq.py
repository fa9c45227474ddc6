"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum layout), 4 and 8 bits.

On disk, per linear layer (K input features, N output features, G groups):
  qweight  int32 [K / pack, N]   values packed along K, value i of a word at bits i*bits
  qzeros   int32 [G, N / pack]   zero points packed along N; the classic format
                                 (checkpoint_format "gptq", v1) stores zero - 1
  scales   fp16  [G, N]
  g_idx    int32 [K]             group of each input row (used when desc_act is true)
W[k, n] = (q[k, n] - zero[g(k), n]) * scale[g(k), n], with g(k) = g_idx[k] under desc_act
and k // group_size otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
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
    FUSED_PARTS,
    IntGroupLinearMethod,
    check_input_packing,
    check_output_packing,
    dummy_fill,
    dummy_g_idx,
    input_groups,
    is_layer_excluded,
    is_layer_named,
    make_g_idx_param,
    make_param,
)
from pagedllm.layers.quantization.kernels.int_group import IntGroupScheme, check_bits, unpack_int32

_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GPTQConfig(QuantizationConfig):
    """A GPTQ checkpoint's quantization_config."""

    weight_bits: int
    group_size: int
    desc_act: bool
    sym: bool = True
    checkpoint_format: str = "gptq"
    modules_to_not_convert: tuple[str, ...] = ()
    # GPTQModel's per-module overrides: regex -> {} ("-:" prefix: leave unquantized).
    dynamic: dict[str, dict[str, Any]] = field(default_factory=dict)
    # GPTQModel / AutoRound: the block's layers that are quantized (names within a decoder
    # layer, e.g. "self_attn.q_proj"); the others hold plain weights. Empty: all of them.
    modules_in_block_to_quantize: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "GPTQ bits")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"GPTQ group_size={self.group_size} is invalid; use -1 or a positive size.")
        if self.checkpoint_format not in _CHECKPOINT_FORMATS:
            raise ValueError(
                f"GPTQ checkpoint_format={self.checkpoint_format!r} is not supported; use one of "
                f"{_CHECKPOINT_FORMATS}."
            )

    @property
    def pack_factor(self) -> int:
        """Values per int32 word (as vLLM's config names it)."""
        return 32 // self.weight_bits

    def get_name(self) -> str:
        return "gptq"

    def tensor_parallel_units(self) -> TensorParallelUnits | None:
        # Act order: every rank keeps all groups' scales and slices g_idx.
        if self.desc_act or self.group_size == -1:
            return None
        return TensorParallelUnits(self.group_size, 1, "group_size")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPTQConfig:
        if "bits" not in config:
            raise ValueError(
                "quantization='gptq' needs a GPTQ checkpoint: its config.json quantization_config "
                "must give bits, group_size and desc_act."
            )
        if config.get("lm_head"):
            raise ValueError("GPTQ lm_head=true (a quantized lm_head) is not supported; use a "
                             "checkpoint with lm_head=false.")
        return cls(
            weight_bits=int(config["bits"]),
            group_size=int(config.get("group_size", 128)),
            desc_act=bool(config.get("desc_act", False)),
            sym=bool(config.get("sym", True)),
            # GPTQModel writes "format"; AutoGPTQ and optimum "checkpoint_format".
            checkpoint_format=str(config.get("checkpoint_format") or config.get("format") or "gptq").lower(),
            modules_to_not_convert=tuple(config.get("modules_to_not_convert") or ()),
            dynamic=dict(config.get("dynamic") or {}),
            modules_in_block_to_quantize=_flat_names(config.get("modules_in_block_to_quantize")),
        )

    def _dynamic_override(self, prefix: str) -> dict[str, Any] | None:
        """The override for `prefix` ({} when none); None when a "-:" rule excludes it."""
        head, _, last = prefix.rpartition(".")
        names = [prefix, *(f"{head}.{part}" for part in FUSED_PARTS.get(last, ()))]
        for pattern, override in self.dynamic.items():
            negative = pattern.startswith("-:")
            regex = pattern[2:] if pattern[:2] in ("-:", "+:") else pattern
            if any(re.match(regex, name) for name in names):
                return None if negative else dict(override)
        return {}

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase:
        if is_layer_excluded(prefix, self.modules_to_not_convert):
            return UnquantizedLinearMethod()
        if self.modules_in_block_to_quantize and not is_layer_named(
                prefix, self.modules_in_block_to_quantize, "(modules_in_block_to_quantize) quantizes"):
            return UnquantizedLinearMethod()
        override = self._dynamic_override(prefix)
        if override is None:
            return UnquantizedLinearMethod()
        config = self
        if override:
            known = {"bits": "weight_bits", "group_size": "group_size", "desc_act": "desc_act", "sym": "sym"}
            config = replace(self, **{known[k]: v for k, v in override.items() if k in known})
        return GPTQLinearMethod(config)


def _flat_names(groups: Any) -> tuple[str, ...]:
    """modules_in_block_to_quantize as written: a list of names, or of lists of them."""
    if not groups:
        return ()
    return tuple(name for group in groups for name in ([group] if isinstance(group, str) else group))


class GPTQLinearMethod(IntGroupLinearMethod):
    def __init__(self, config: GPTQConfig) -> None:
        self.config = config
        self.scheme = IntGroupScheme(config.weight_bits, config.group_size, config.desc_act)

    def create_weights(
        self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
        input_size: int, output_size: int, params_dtype: torch.dtype,
    ) -> None:
        pack = self.scheme.pack_factor
        check_input_packing(layer, input_size_per_partition, pack, "GPTQ")
        check_output_packing(layer, output_partition_sizes, pack)
        groups, split = input_groups(self.scheme, layer, input_size_per_partition, input_size, True)
        group_dim = 0 if split else None
        num_outputs = sum(output_partition_sizes)
        packed = {"packed_dim": 0, "pack_factor": pack}
        make_param(layer, "qweight", (input_size_per_partition // pack, num_outputs), torch.int32,
                   {"input_dim": 0, "output_dim": 1, **packed})
        make_param(layer, "qzeros", (groups, num_outputs // pack), torch.int32,
                   {"input_dim": group_dim, "output_dim": 1, "packed_dim": 1, "pack_factor": pack})
        make_param(layer, "scales", (groups, num_outputs), params_dtype,
                   {"input_dim": group_dim, "output_dim": 1})
        make_g_idx_param(layer, "g_idx", len(output_partition_sizes), input_size_per_partition)
        # Without desc_act the rows are in group order and g_idx is unused: some exporters omit it.
        layer.g_idx.optional_in_checkpoint = not self.scheme.act_order

    def to_internal(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        zeros = unpack_int32(layer.qzeros.data, self.scheme.bits, dim=1)
        if self.config.checkpoint_format == "gptq":
            # v1 stores zero - 1 in `bits` bits, so a zero of 0 was stored as all ones.
            zeros = (zeros + 1) & ((1 << self.scheme.bits) - 1)
        g_idx = layer.g_idx.data if self.scheme.act_order else None
        qweight, scales = layer.qweight.data, layer.scales.data
        del layer.qzeros, layer.g_idx
        return qweight, scales, zeros, g_idx

    def dummy_init(self, layer: nn.Module, generator: torch.Generator) -> None:
        dummy_fill(layer.qweight, generator)
        dummy_fill(layer.qzeros, generator)
        dummy_fill(layer.scales, generator, scale=2e-3 / 2**self.scheme.bits)
        dummy_g_idx(layer, layer.g_idx, self.scheme.group_size)
