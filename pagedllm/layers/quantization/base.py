"""The quantization seam: a linear layer holds a `LinearMethodBase` that creates its
parameters and computes `x @ W.T + b`; the layer only owns the tensor-parallel split.
Also the helpers every `weight_loader` uses to slice and copy checkpoint tensors.

Parameters carry attributes that tell the layer's `weight_loader` how to shard them:
  output_dim   the dimension split across ranks by column-parallel layers (None: not split)
  input_dim    the dimension split across ranks by row-parallel layers (None: not split)
  packed_dim, pack_factor   for packed integer weights: that dimension holds pack_factor
               logical elements per stored element, so shard offsets along it are divided
  optional_in_checkpoint   True for a parameter the checkpoint does not hold: it is computed
               from other tensors as they load (dynamic fp8's weight scales)
A method that needs its own loading rule sets `weight_loader` on the parameter itself.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagedllm.layers.ops import dense_linear, dense_linear_with_epilogue


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any]) -> None:
    """Attach loading attributes (output_dim, input_dim, weight_loader, ...) to a parameter."""
    for key, value in attrs.items():
        if hasattr(param, key) and key != "weight_loader":
            raise AttributeError(f"Parameter already has attribute {key!r}.")
        setattr(param, key, value)


# A checkpoint tensor, or an object that slices like one without reading the file
# (safetensors' `get_slice`), so a rank reads only its shard.
LoadedWeight = Any


def loaded_shape(loaded: LoadedWeight) -> tuple[int, ...]:
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def narrow_loaded_weight(loaded: LoadedWeight, dim: int, start: int, length: int) -> LoadedWeight:
    """Rows start:start+length of `loaded` along `dim`: the one place checkpoint tensors are
    sliced, so lazily sliceable ones read only this part."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, length)
    index = [slice(None)] * len(loaded_shape(loaded))
    index[dim] = slice(start, start + length)
    return loaded[tuple(index)]


def copy_loaded_weight(dst: torch.Tensor, loaded: LoadedWeight, name: str) -> None:
    if not isinstance(loaded, torch.Tensor):
        loaded = loaded[tuple(slice(None) for _ in loaded_shape(loaded))]
    if tuple(dst.shape) != tuple(loaded.shape):
        raise ValueError(
            f"Checkpoint tensor for {name} has shape {tuple(loaded.shape)} but this rank's "
            f"parameter shard has shape {tuple(dst.shape)}; the checkpoint does not match the "
            "model config."
        )
    dst.copy_(loaded)


class LinearMethodBase(ABC):
    """How a linear layer stores its weight and computes its output."""

    @abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        """Register this rank's parameters on `layer`. `output_partition_sizes` has one entry
        per fused sub-matrix (e.g. q, k, v), each already divided by the tensor-parallel size."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's `x @ W.T (+ bias)`."""

    def apply_with_epilogue(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, epilogue: Any
    ) -> torch.Tensor | None:
        """`apply` followed by `epilogue` (an ops/epilogue.py Epilogue: SiLU-and-mul of a
        gate_up layer, rope of a qkv layer) in the matmul's own kernel; None (the default)
        where the method has no such kernel for this x, and the caller runs `apply` and then
        the op itself."""
        return None

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack or convert weights once every shard is loaded (default: nothing to do)."""
        return None

    def fused_input_quantization(self, layer: nn.Module) -> torch.dtype | None:
        """The dtype this layer wants its input quantized to per token by the kernel that
        produces it (a QuantizedActivation, see quantized_activation.py), or None: apply then
        always gets a plain tensor. Asked once the weights are processed."""
        return None

    def initialize_dummy_weights(self, layer: nn.Module) -> None:
        """load_format="dummy": after every parameter got small random values (integers zero),
        give quantized ones values that make sense for the scheme (positive scales, weights
        over the whole quantized range, random packs). Default: keep the generic values."""
        return None


@dataclass(frozen=True)
class TensorParallelUnits:
    """What a scheme needs of a tensor-parallel split: whole groups or blocks per rank."""

    input_unit: int
    """Rows a row-parallel rank's input must hold a multiple of (a group, a block's columns)."""
    output_unit: int
    """Columns a column-parallel rank's output must hold a multiple of (a block's rows)."""
    source: str
    """The quantization_config field that sets them, for the error message."""


class QuantizationConfig(ABC):
    """A checkpoint's quantization scheme; picks the linear method of each layer."""

    def tensor_parallel_units(self) -> TensorParallelUnits | None:
        """The split units the scheme imposes (engine/tensor_parallel_split.py); None for
        none (per-tensor or per-channel scales, act order)."""
        return None

    @abstractmethod
    def get_name(self) -> str:
        """The name users pass as `quantization=` (e.g. "fp8", "awq")."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        """Reads the checkpoint's `quantization_config` ({} when the checkpoint has none and
        the weights are quantized while loading)."""

    @abstractmethod
    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase:
        """The method for the linear layer named `prefix` (return `UnquantizedLinearMethod()`
        for layers the checkpoint keeps in full precision)."""


class UnquantizedLinearMethod(LinearMethodBase):
    """A plain [output, input] weight in the model's dtype."""

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        weight = nn.Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        set_weight_attrs(weight, {"output_dim": 0, "input_dim": 1})
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return dense_linear(x, layer.weight, bias)

    def apply_with_epilogue(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, epilogue: Any
    ) -> torch.Tensor | None:
        return dense_linear_with_epilogue(x, layer.weight, bias, epilogue)


# Checkpoint names of the matrices each fused layer of the models is built from.
FUSED_LAYER_PARTS: Mapping[str, Sequence[str]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def name_matches(name: str, entry: str) -> bool:
    """A quantization config's layer entry: "re:<regex>" (matched from the start, as
    compressed-tensors does), an exact name, or a module name ("lm_head") ending the name."""
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None
    return name == entry or name.endswith("." + entry) or name.startswith(entry + ".")


def checkpoint_names_of(prefix: str) -> list[str]:
    """The checkpoint module names a layer named `prefix` is built from (its fused parts)."""
    head, _, last = prefix.rpartition(".")
    parts = FUSED_LAYER_PARTS.get(last)
    if parts is None:
        return [prefix]
    return [f"{head}.{part}" if head else part for part in parts]


def is_layer_ignored(prefix: str, ignore: Sequence[str]) -> bool:
    """Whether the layer `prefix` is on a checkpoint's list of unquantized layers. A fused layer
    is ignored when all its parts are; some but not all is a ValueError (one layer holds one
    scheme)."""
    names = checkpoint_names_of(prefix)
    hits = [any(name_matches(name, entry) for entry in ignore) for name in names]
    if all(hits) or any(name_matches(prefix, entry) for entry in ignore):
        return True
    if any(hits):
        raise ValueError(
            f"The quantization config leaves {[n for n, h in zip(names, hits) if h]} unquantized but "
            f"not {[n for n, h in zip(names, hits) if not h]}; they are fused into {prefix}, which "
            "holds one scheme: list all of them or none in the ignore list."
        )
    return False
