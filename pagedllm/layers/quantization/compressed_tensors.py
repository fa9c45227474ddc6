"""compressed-tensors checkpoints (llm-compressor's format, quant_method "compressed-tensors").

    {"quant_method": "compressed-tensors", "format": "float-quantized" | "int-quantized" |
       "naive-quantized" | "pack-quantized",
     "config_groups": {"group_0": {"targets": ["Linear"] or names / "re:" regexes,
                                   "weights": {num_bits, type, strategy, symmetric, dynamic,
                                               group_size, block_structure, actorder},
                                   "input_activations": {...} or null, "format": optional}},
     "ignore": ["lm_head", "re:.*mlp.gate$", ...]}

Supported: 8-bit fp8 or int8 weights (per tensor, per channel; fp8 also per block) with
activations per token (dynamic), per tensor (static) or none (W8A8 / W8A16) through
`W8A8LinearMethod`, and 4/8-bit packed integer weights with group scales (`pack-quantized`,
W4A16) through `CompressedTensorsWNA16`. Scales keep the checkpoint's names: weight_scale,
input_scale, input_zero_point.
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
    name_matches,
    checkpoint_names_of,
    is_layer_ignored,
)
from pagedllm.layers.quantization.kernels.w8a8 import FP8_DTYPE
from pagedllm.layers.quantization.w8a8 import W8A8LinearMethod, W8A8Scheme

_FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")
# A target naming a module class rather than a module: every linear layer matches it.
_LINEAR_CLASS_TARGETS = ("Linear", "torch.nn.Linear", "nn.Linear")


@dataclass(frozen=True)
class QuantArgs:
    """One `weights` / `input_activations` entry of a config group."""

    num_bits: int = 8
    type: str = "int"
    strategy: str = "tensor"
    symmetric: bool = True
    dynamic: bool = False
    group_size: int | None = None
    block_structure: tuple[int, int] | None = None
    actorder: str | None = None

    @classmethod
    def parse(cls, raw: dict[str, Any], where: str) -> QuantArgs:
        strategy = raw.get("strategy") or ("group" if raw.get("group_size") else "tensor")
        if strategy not in ("tensor", "channel", "group", "block", "token"):
            raise ValueError(f"compressed-tensors {where}: strategy={strategy!r} is not supported; "
                             "use tensor, channel, group, block or token.")
        kind = str(raw.get("type", "int"))
        if kind not in ("int", "float"):
            raise ValueError(f"compressed-tensors {where}: type={kind!r}; use 'int' or 'float'.")
        block = raw.get("block_structure")
        actorder = raw.get("actorder")
        return cls(
            num_bits=int(raw.get("num_bits", 8)), type=kind, strategy=strategy,
            symmetric=bool(raw.get("symmetric", True)), dynamic=bool(raw.get("dynamic", False)),
            group_size=int(raw["group_size"]) if raw.get("group_size") else None,
            block_structure=(int(block[0]), int(block[1])) if block else None,
            actorder=str(actorder) if actorder not in (None, False) else None,
        )


@dataclass(frozen=True)
class ConfigGroup:
    targets: tuple[str, ...]
    weights: QuantArgs
    input_activations: QuantArgs | None
    format: str


class CompressedTensorsConfig(QuantizationConfig):
    def __init__(self, groups: tuple[ConfigGroup, ...], ignore: tuple[str, ...]) -> None:
        self.groups = groups
        self.ignore = ignore

    def get_name(self) -> str:
        return "compressed-tensors"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensorsConfig:
        raw_groups = config.get("config_groups") or {}
        if not raw_groups:
            raise ValueError(
                "quantization='compressed-tensors' needs a compressed-tensors checkpoint (config.json "
                "quantization_config with config_groups); for an unquantized checkpoint use "
                "quantization='fp8'."
            )
        default_format = str(config.get("format") or "naive-quantized")
        groups = []
        for group_name, raw in raw_groups.items():
            fmt = str(raw.get("format") or default_format)
            if fmt not in _FORMATS:
                raise ValueError(
                    f"compressed-tensors config group {group_name!r} has format={fmt!r}; supported "
                    f"formats: {', '.join(_FORMATS)}."
                )
            if not raw.get("weights"):
                raise ValueError(f"compressed-tensors config group {group_name!r} quantizes no weights; "
                                 "only weight quantization schemes are supported.")
            activations = raw.get("input_activations")
            groups.append(ConfigGroup(
                targets=tuple(raw.get("targets") or ()),
                weights=QuantArgs.parse(raw["weights"], f"{group_name}.weights"),
                input_activations=(
                    QuantArgs.parse(activations, f"{group_name}.input_activations") if activations else None
                ),
                format=fmt,
            ))
        return cls(tuple(groups), tuple(config.get("ignore") or ()))

    def tensor_parallel_units(self) -> TensorParallelUnits | None:
        for group in self.groups:
            weights = group.weights
            if weights.block_structure is not None:
                block_n, block_k = weights.block_structure
                return TensorParallelUnits(block_k, block_n, "block_structure")
            if weights.strategy == "group" and weights.group_size and weights.actorder is None:
                return TensorParallelUnits(weights.group_size, 1, "group_size")
        return None

    def _group_of(self, prefix: str) -> ConfigGroup | None:
        names = checkpoint_names_of(prefix)
        for group in self.groups:
            if any(target in _LINEAR_CLASS_TARGETS for target in group.targets):
                return group
            if all(any(name_matches(name, t) for t in group.targets) for name in names):
                return group
        return None

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase:
        if is_layer_ignored(prefix, self.ignore):
            return UnquantizedLinearMethod()
        group = self._group_of(prefix)
        if group is None:
            return UnquantizedLinearMethod()
        weights, activations = group.weights, group.input_activations
        if group.format == "pack-quantized":
            from pagedllm.layers.quantization.compressed_tensors_wNa16 import CompressedTensorsWNA16

            return CompressedTensorsWNA16(
                num_bits=weights.num_bits, group_size=weights.group_size,
                symmetric=weights.symmetric, strategy=weights.strategy, actorder=weights.actorder,
            )
        return W8A8LinearMethod(_w8a8_scheme(prefix, weights, activations))


def _w8a8_scheme(prefix: str, weights: QuantArgs, activations: QuantArgs | None) -> W8A8Scheme:
    where = f"compressed-tensors scheme of {prefix}"
    if weights.num_bits != 8:
        raise ValueError(
            f"{where}: {weights.num_bits}-bit weights need format 'pack-quantized'; unpacked formats "
            "support 8-bit weights."
        )
    weight_dtype = FP8_DTYPE if weights.type == "float" else torch.int8
    if not weights.symmetric:
        raise ValueError(f"{where}: asymmetric 8-bit weights are not supported; use symmetric=true.")
    if weights.strategy not in ("tensor", "channel", "block") or (
        weights.strategy == "block" and weight_dtype != FP8_DTYPE
    ):
        raise ValueError(
            f"{where}: weights strategy {weights.strategy!r} is not supported for {weights.type} "
            "weights; use tensor or channel (or block for float weights)."
        )
    if activations is None:
        return W8A8Scheme(weight_dtype, weights.strategy, block_size=weights.block_structure,
                          activation_quantized=False)
    if activations.num_bits != 8 or activations.type != weights.type:
        raise ValueError(
            f"{where}: {activations.num_bits}-bit {activations.type} activations with "
            f"{weights.type} weights are not supported; use 8-bit activations of the weights' type."
        )
    if activations.dynamic and activations.strategy not in ("token", "group"):
        raise ValueError(f"{where}: dynamic activations need strategy 'token' or 'group', "
                         f"got {activations.strategy!r}.")
    if not activations.dynamic and activations.strategy != "tensor":
        raise ValueError(f"{where}: static activations need strategy 'tensor', got {activations.strategy!r}.")
    if not activations.symmetric and weight_dtype == FP8_DTYPE:
        raise ValueError(f"{where}: asymmetric fp8 activations are not supported; use symmetric=true.")
    return W8A8Scheme(
        weight_dtype, weights.strategy, block_size=weights.block_structure,
        activation_dynamic=activations.dynamic, activation_symmetric=activations.symmetric,
        activation_group_size=activations.group_size if activations.strategy == "group" else None,
    )
