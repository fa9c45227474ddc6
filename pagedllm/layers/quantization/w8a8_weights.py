"""The weights of every 8-bit scheme (w8a8.py computes with them): fp8 or int8 weights with
per-tensor, per-channel or block scales, static input scales and zero points, their loaders
(checkpoint names, so checkpoints load without renaming), dynamic fp8's quantization while
loading, and dummy weights.

Parameters (this rank's shard):
  weight            [out, in] fp8 or int8
  weight_scale      [out, 1] per channel, or one per fused shard ([num_shards]) per tensor
  weight_scale / weight_scale_inv   [ceil(out/bn), ceil(in/bk)] block scales (the second is
                    the name in quant_method "fp8" checkpoints)
  input_scale       one per fused shard, static activations only
  input_zero_point  one per fused shard, static asymmetric int8 activations only
After loading, per-tensor scales of fused shards become per-channel ones (exact, unlike vLLM's
requantization to the largest scale) and static input scales of fused shards take their
largest (the shards share one input, so tools write equal scales).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from pagedllm.layers.quantization.base import (
    LinearMethodBase,
    LoadedWeight,
    copy_loaded_weight,
    loaded_shape,
    narrow_loaded_weight,
    set_weight_attrs,
)
from pagedllm.layers.quantization.kernels.w8a8 import FP8_DTYPE, absmax_scale, dequantize, qmax_of, quantize

# Rows quantized at a time while loading, so the float32 temporary stays small.
_QUANTIZE_ROWS = 4096


@dataclass(frozen=True)
class W8A8Scheme:
    weight_dtype: torch.dtype
    """FP8_DTYPE or torch.int8."""
    weight_strategy: str
    """"tensor", "channel" or "block"."""
    block_size: tuple[int, int] | None = None
    """(rows, columns) of one weight block, for weight_strategy "block"."""
    activation_quantized: bool = True
    """False: weight-only (activations stay in the model dtype)."""
    activation_dynamic: bool = True
    """True: a scale per token computed at run time; False: the checkpoint's input_scale."""
    activation_symmetric: bool = True
    """False: int8 activations with a zero point."""
    activation_group_size: int | None = None
    """Dynamic scales per token and group of this many columns (block fp8), else per token."""
    quantize_while_loading: bool = False
    """The checkpoint is unquantized: each weight is quantized as it loads (dynamic fp8)."""
    weight_scale_name: str = "weight_scale"
    """The scales' checkpoint name ("weight_scale_inv" for block-wise fp8 checkpoints)."""


def _shard_index(shard_id: object) -> int:
    if isinstance(shard_id, str):
        return "qkv".index(shard_id)
    return int(shard_id)  # type: ignore[call-overload]


def _read_whole(loaded: LoadedWeight) -> torch.Tensor:
    if isinstance(loaded, torch.Tensor):
        return loaded
    return loaded[tuple(slice(None) for _ in loaded_shape(loaded))]


class W8A8Weights(LinearMethodBase):
    """The parameters of an 8-bit scheme's layer, their loaders, and what is settled once
    they are loaded (per-row scales, the block map); w8a8.W8A8LinearMethod computes with them."""

    def __init__(self, scheme: W8A8Scheme) -> None:
        self.scheme = scheme

    # ---- parameters -------------------------------------------------------------------
    def create_weights(
        self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
        input_size: int, output_size: int, params_dtype: torch.dtype,
    ) -> None:
        scheme = self.scheme
        num_out = sum(output_partition_sizes)
        weight = nn.Parameter(
            torch.empty(num_out, input_size_per_partition, dtype=scheme.weight_dtype), requires_grad=False
        )
        set_weight_attrs(weight, {"output_dim": 0, "input_dim": 1})
        if scheme.quantize_while_loading:
            weight.weight_loader = functools.partial(self._load_and_quantize, layer)
        layer.register_parameter("weight", weight)

        if scheme.weight_strategy == "channel":
            scale = nn.Parameter(torch.empty(num_out, 1, dtype=torch.float32), requires_grad=False)
            set_weight_attrs(scale, {"output_dim": 0})
            if scheme.quantize_while_loading:
                set_weight_attrs(scale, {"optional_in_checkpoint": True})
        elif scheme.weight_strategy == "tensor":
            scale = self._per_shard_parameter(layer, len(output_partition_sizes))
        elif scheme.weight_strategy == "block":
            scale = self._block_scale_parameter(layer, input_size_per_partition, output_partition_sizes, input_size)
        else:
            raise ValueError(f"weight strategy {scheme.weight_strategy!r} is not supported; use tensor, channel or block.")
        layer.register_parameter(scheme.weight_scale_name, scale)

        if scheme.activation_quantized and not scheme.activation_dynamic:
            layer.register_parameter("input_scale", self._per_shard_parameter(layer, len(output_partition_sizes)))
            if not scheme.activation_symmetric:
                layer.register_parameter(
                    "input_zero_point", self._per_shard_parameter(layer, len(output_partition_sizes))
                )
        layer.w8a8_kernel = "reference"

    def _per_shard_parameter(self, layer: nn.Module, num_shards: int) -> nn.Parameter:
        param = nn.Parameter(torch.empty(num_shards, dtype=torch.float32), requires_grad=False)
        param.weight_loader = functools.partial(self._load_per_shard, layer)
        return param

    def _block_scale_parameter(
        self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int], input_size: int
    ) -> nn.Parameter:
        assert self.scheme.block_size is not None
        block_n, block_k = self.scheme.block_size
        tp_size = getattr(layer, "tp_size", 1)
        if input_size_per_partition != input_size and input_size_per_partition % block_k:
            raise ValueError(
                f"{layer.prefix}: its input features split over tensor_parallel_size={tp_size} give "
                f"{input_size_per_partition} per rank, not a multiple of the weight block size "
                f"{block_k}, so a block would straddle ranks; use a tensor_parallel_size that keeps "
                f"{block_k}-column blocks whole."
            )
        if tp_size > 1 and sum(output_partition_sizes) != layer.output_size:
            for size in output_partition_sizes:
                if size % block_n:
                    raise ValueError(
                        f"{layer.prefix}: its output features split over tensor_parallel_size="
                        f"{tp_size} give {size} per rank, not a multiple of the weight block size "
                        f"{block_n}, so a block would straddle ranks; use a tensor_parallel_size "
                        f"that keeps {block_n}-row blocks whole."
                    )
        rows = sum(math.ceil(size / block_n) for size in output_partition_sizes)
        scale = nn.Parameter(
            torch.empty(rows, math.ceil(input_size_per_partition / block_k), dtype=torch.float32),
            requires_grad=False,
        )
        scale.weight_loader = functools.partial(self._load_block_scale, layer)
        return scale

    # ---- loading ----------------------------------------------------------------------
    def _load_per_shard(self, layer: nn.Module, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        value = _read_whole(loaded).reshape(-1)
        if value.numel() != 1:
            raise ValueError(
                f"{layer.prefix}: expected one per-tensor scale, got shape {tuple(loaded_shape(loaded))}; "
                "the checkpoint's scales do not match its quantization_config strategy."
            )
        if shard_id is None:
            param.data.fill_(value.item())
        else:
            param.data[_shard_index(shard_id)] = value[0]

    def _load_block_scale(self, layer: nn.Module, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        assert self.scheme.block_size is not None
        block_n, block_k = self.scheme.block_size
        parts = layer.output_partition_sizes
        if shard_id is None:
            if len(parts) > 1:
                raise ValueError(
                    f"{layer.prefix}: block scales of an already fused checkpoint matrix are not "
                    "supported; the checkpoint must store the fused parts separately."
                )
            param_row, num_rows = 0, param.shape[0]
            loaded_row = layer.tp_rank * num_rows if parts[0] != layer.output_size else 0
        else:
            index = _shard_index(shard_id)
            _, size, loaded_offset = layer._shard_placement(shard_id)
            param_row = sum(math.ceil(p / block_n) for p in parts[:index])
            num_rows = math.ceil(size / block_n)
            loaded_row = loaded_offset // block_n
        loaded = narrow_loaded_weight(loaded, 0, loaded_row, num_rows)
        num_cols = param.shape[1]
        if layer.input_size_per_partition != layer.input_size:
            loaded = narrow_loaded_weight(loaded, 1, layer.tp_rank * num_cols, num_cols)
        copy_loaded_weight(param.data.narrow(0, param_row, num_rows), loaded, f"{layer.prefix} block scales")

    def _load_and_quantize(self, layer: nn.Module, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        """Dynamic fp8: the layer's own loader writes the shard into a staging tensor in the
        model dtype; once every shard of the layer is in, it is quantized per output channel
        and the staging tensor freed, so loading never holds more than one layer unquantized."""
        staging = getattr(layer, "_staging_weight", None)
        if staging is None:
            staging = torch.empty(param.shape, dtype=layer.params_dtype, device=param.device)
            set_weight_attrs(staging, {"output_dim": 0, "input_dim": 1})
            layer._staging_weight = staging
            layer._staging_shards = set()
        layer.weight_loader(staging, loaded, shard_id)
        if shard_id is not None:
            layer._staging_shards.add(shard_id)
            if len(layer._staging_shards) < len(layer.output_partition_sizes):
                return
        scale_param = getattr(layer, self.scheme.weight_scale_name)
        for start in range(0, staging.shape[0], _QUANTIZE_ROWS):
            rows = staging[start : start + _QUANTIZE_ROWS]
            scale = absmax_scale(rows, -1, self.scheme.weight_dtype)
            param.data[start : start + _QUANTIZE_ROWS] = quantize(rows, scale, self.scheme.weight_dtype)
            scale_param.data[start : start + _QUANTIZE_ROWS] = scale
        del layer._staging_weight, layer._staging_shards

    # ---- after loading ----------------------------------------------------------------
    def settle_scales(self, layer: nn.Module) -> None:
        """Per-tensor scales of fused shards as per-row ones, one static input scale and zero
        point, and for block scales the block row of every weight row."""
        scheme = self.scheme
        parts = torch.tensor(layer.output_partition_sizes, device=layer.weight.device)
        if scheme.weight_strategy == "tensor":
            per_row = layer.weight_scale.data.repeat_interleave(parts).unsqueeze(1)
            layer.weight_scale = nn.Parameter(per_row.contiguous(), requires_grad=False)
        if hasattr(layer, "input_scale"):
            layer.input_scale = nn.Parameter(layer.input_scale.data.max().reshape(1), requires_grad=False)
        if hasattr(layer, "input_zero_point"):
            layer.input_zero_point = nn.Parameter(layer.input_zero_point.data[:1].clone(), requires_grad=False)
        if scheme.weight_strategy == "block":
            assert scheme.block_size is not None
            block_n = scheme.block_size[0]
            row_block = [
                offset + row // block_n
                for offset, size in zip(_block_offsets(layer.output_partition_sizes, block_n), layer.output_partition_sizes)
                for row in range(size)
            ]
            layer.register_buffer(
                "weight_scale_row_block", torch.tensor(row_block, device=layer.weight.device), persistent=False
            )

    def dequantized_weight(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """This rank's weight in `dtype` (the reference path's weight, rebuilt each call so
        only the 8-bit copy is kept)."""
        if self.scheme.weight_strategy != "block":
            return dequantize(layer.weight, layer.weight_scale, dtype)
        assert self.scheme.block_size is not None
        block_k = self.scheme.block_size[1]
        scale = getattr(layer, self.scheme.weight_scale_name)[layer.weight_scale_row_block]
        scale = scale.repeat_interleave(block_k, dim=1)[:, : layer.weight.shape[1]]
        return dequantize(layer.weight, scale, dtype)

    def initialize_dummy_weights(self, layer: nn.Module) -> None:
        """Random 8-bit values over the whole range and positive scales that map them to about
        +-1e-3 (the magnitude of the dummy format's unquantized weights)."""
        generator = torch.Generator(device=layer.weight.device).manual_seed(0)
        qmax = qmax_of(self.scheme.weight_dtype)
        noise = torch.empty(layer.weight.shape, dtype=torch.float16, device=layer.weight.device)
        noise.uniform_(-qmax, qmax, generator=generator)
        layer.weight.data.copy_(noise if self.scheme.weight_dtype == FP8_DTYPE else noise.round())
        getattr(layer, self.scheme.weight_scale_name).data.fill_(1e-3 / qmax)
        if hasattr(layer, "input_scale"):
            layer.input_scale.data.fill_(1.0 / qmax)
        if hasattr(layer, "input_zero_point"):
            layer.input_zero_point.data.zero_()


def _block_offsets(partition_sizes: list[int], block_n: int) -> list[int]:
    offsets, total = [], 0
    for size in partition_sizes:
        offsets.append(total)
        total += math.ceil(size / block_n)
    return offsets
