"""What GPTQ, AWQ and compressed-tensors W4A16/W8A16 share: checking how a layer's groups
split across tensor-parallel ranks, loading `g_idx`, filling dummy weights, repacking into the
one internal layout of kernels/int_group.py after loading, and the matmul over it (the Triton
kernel on CUDA, the dequantize-then-matmul reference elsewhere, chosen once per layer).

A format subclass declares its checkpoint parameters in `create_weights` and converts them in
`to_internal`; everything after that is common.
"""

from __future__ import annotations

import functools
import logging
from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from pagedllm.layers.quantization.base import (
    LinearMethodBase,
    LoadedWeight,
    copy_loaded_weight,
    narrow_loaded_weight,
    set_weight_attrs,
)
from pagedllm.layers.quantization.kernels.int_group import (
    IntGroupScheme,
    pack_int32,
    reference_matmul,
    to_internal_words,
    unpack_int32,
)

logger = logging.getLogger(__name__)

# Fused layers' checkpoint parts, for matching exclusion lists written in checkpoint names.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_QKV_SHARD_INDEX = {"q": 0, "k": 1, "v": 2}


def _names_module(name: str, pattern: str) -> bool:
    # Whole dotted components only: "mlp.gate" (a MoE router) must not catch "mlp.gate_proj".
    return f".{pattern.strip('.')}." in f".{name}."


def is_layer_excluded(prefix: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Whether the layer `prefix` (or every checkpoint part of a fused one) is named by one of
    `patterns` (module names or dotted parts of them, as AWQ and GPTQ tools write them)."""
    return is_layer_named(prefix, patterns, "excludes")


def is_layer_named(prefix: str, patterns: list[str] | tuple[str, ...], verb: str) -> bool:
    """is_layer_excluded for any list of names; `verb` says what the list does, for the error
    when it names only some parts of a fused layer."""
    if not patterns:
        return False
    head, _, last = prefix.rpartition(".")
    names = [f"{head}.{part}" if head else part for part in FUSED_PARTS.get(last, ())] or [prefix]
    matched = [any(_names_module(name, pattern) for pattern in patterns) for name in names]
    if any(matched) and not all(matched):
        raise ValueError(
            f"The quantization config {verb} only some parts of the fused layer {prefix} "
            f"({', '.join(n for n, m in zip(names, matched) if m)}); pagedllm fuses them into "
            "one matrix, so the checkpoint must treat all of them alike."
        )
    return all(matched)


def valid_tp_sizes(input_size: int, multiple: int) -> list[int]:
    return [t for t in range(1, 65) if input_size % t == 0 and (input_size // t) % multiple == 0]


def input_groups(scheme: IntGroupScheme, layer: nn.Module, input_size_per_partition: int,
                 input_size: int, packed_along_input: bool) -> tuple[int, bool]:
    """(groups this rank stores, whether scales/zeros are split along input like the weight).

    Row-parallel ranks hold whole groups; with act order a rank's rows belong to any group, so
    every rank keeps all scales and slices g_idx instead (as vLLM does)."""
    total_groups = scheme.num_groups(input_size)
    row_parallel = input_size_per_partition != input_size
    if not row_parallel or scheme.group_size == -1:
        return total_groups, False
    tp_size = input_size // input_size_per_partition
    if packed_along_input and input_size_per_partition % scheme.pack_factor:
        raise ValueError(
            f"{layer.prefix}: input size {input_size} split over tensor_parallel_size={tp_size} "
            f"gives {input_size_per_partition} rows per rank, not a multiple of the "
            f"{scheme.pack_factor} values packed per int32; use tensor_parallel_size in "
            f"{valid_tp_sizes(input_size, scheme.pack_factor)}."
        )
    if scheme.act_order:
        return total_groups, False
    if input_size_per_partition % scheme.group_size:
        raise ValueError(
            f"{layer.prefix}: input size {input_size} split over tensor_parallel_size={tp_size} "
            f"gives {input_size_per_partition} rows per rank, not a multiple of group_size="
            f"{scheme.group_size}, so quantization groups would straddle ranks; use "
            f"tensor_parallel_size in {valid_tp_sizes(input_size, scheme.group_size)}."
        )
    return input_size_per_partition // scheme.group_size, True


def check_input_packing(layer: nn.Module, input_size_per_partition: int, pack: int, format_name: str) -> None:
    if input_size_per_partition % pack:
        raise ValueError(
            f"{layer.prefix}: {format_name} input size {input_size_per_partition} per rank is not a "
            f"multiple of the {pack} values packed per int32; use a tensor_parallel_size that "
            "keeps it a multiple."
        )


def check_output_packing(layer: nn.Module, output_partition_sizes: list[int], pack: int) -> None:
    for size in output_partition_sizes:
        if size % pack:
            raise ValueError(
                f"{layer.prefix}: output part of {size} features per rank is not a multiple of "
                f"the {pack} values packed per int32 along the output; use a "
                "tensor_parallel_size that keeps each part's size a multiple of it."
            )


def make_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype,
               attrs: dict[str, Any]) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    set_weight_attrs(param, attrs)
    layer.register_parameter(name, param)
    return param


def make_g_idx_param(layer: nn.Module, name: str, num_parts: int, input_size_per_partition: int) -> None:
    """g_idx as [parts, rows]: a fused layer keeps each checkpoint part's own order."""
    param = make_param(layer, name, (num_parts, input_size_per_partition), torch.int32, {})
    row_parallel = input_size_per_partition != layer.input_size

    def load_g_idx(param: nn.Parameter, loaded: LoadedWeight, shard_id: Any = None) -> None:
        if row_parallel:
            rows = param.shape[1]
            loaded = narrow_loaded_weight(loaded, 0, layer.tp_rank * rows, rows)
        parts = range(param.shape[0]) if shard_id is None else [_QKV_SHARD_INDEX.get(shard_id, shard_id)]
        for part in parts:
            copy_loaded_weight(param.data[part], loaded, f"{layer.prefix}.{name}")

    param.weight_loader = load_g_idx


def _part_bounds(layer: nn.Module) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for size in layer.output_partition_sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class IntGroupLinearMethod(LinearMethodBase):
    """A weight-only integer method over the internal layout; subclasses own the checkpoint
    format (their parameters, `to_internal`, `dummy_init`)."""

    scheme: IntGroupScheme

    @property
    def min_sharded_layout_version(self) -> int:
        """Sharded states keep the internal layout; 4-bit words are interleaved since version 2
        (model_loader/sharded_state.py)."""
        return 2 if self.scheme.bits == 4 else 1

    @abstractmethod
    def to_internal(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(qweight [K/pack, N] packed in order along K, scales [G, N], zeros [G, N], g_idx
        [P, K] or None) from the loaded checkpoint parameters, which it then removes from `layer`."""

    @abstractmethod
    def dummy_init(self, layer: nn.Module, generator: torch.Generator) -> None:
        """Fill the checkpoint parameters with random but sane values."""

    def initialize_dummy_weights(self, layer: nn.Module) -> None:
        """load_format='dummy': valid packed integers, small positive scales, in-order g_idx
        (the loader's generic fill zeroes integers and gives scales of either sign)."""
        device = next(layer.parameters()).device
        self.dummy_init(layer, torch.Generator(device=device).manual_seed(0))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        qweight, scales, zeros, g_idx = self.to_internal(layer)
        dtype = layer.params_dtype
        if g_idx is not None:
            perm = torch.argsort(g_idx.long(), dim=1, stable=True).to(torch.int32)
            row_group = torch.gather(g_idx, 1, perm.long()).to(torch.int32)
            values = unpack_int32(qweight, self.scheme.bits, dim=0)
            for part, (start, end) in enumerate(_part_bounds(layer)):
                values[:, start:end] = values[perm[part].long(), start:end]
            qweight = pack_int32(values, self.scheme.bits, dim=0)
            layer.register_parameter("perm", nn.Parameter(perm, requires_grad=False))
            layer.register_parameter("row_group", nn.Parameter(row_group, requires_grad=False))
        qweight = to_internal_words(qweight, self.scheme.bits)
        layer.register_parameter("qweight", nn.Parameter(qweight.contiguous(), requires_grad=False))
        layer.register_parameter("scales", nn.Parameter(scales.to(dtype).contiguous(), requires_grad=False))
        layer.register_parameter("zeros", nn.Parameter(zeros.to(dtype).contiguous(), requires_grad=False))
        # One choice per layer, made once: Triton on CUDA, the readable reference elsewhere.
        layer.int_group_use_triton = qweight.is_cuda and _triton_available()
        if layer.int_group_use_triton:
            from pagedllm.layers.ops.split_k import split_count_buffer

            # One-row split-K launches count their finished splits here (and leave it at zero).
            layer.int_group_split_counts = split_count_buffer(qweight.shape[1], qweight.device)
            logger.debug("%s: int%d weights through the Triton kernel.", layer.prefix, self.scheme.bits)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.int_group_use_triton:
            from pagedllm.layers.quantization.kernels.triton_wNa16 import triton_int_group_matmul

            matmul = functools.partial(triton_int_group_matmul, split_counts=layer.int_group_split_counts)
        else:
            matmul = reference_matmul
        x2d = x.reshape(-1, x.shape[-1])
        bits, group_size = self.scheme.bits, self.scheme.group_size
        if not self.scheme.act_order:
            out = matmul(x2d, layer.qweight, layer.scales, layer.zeros, bits, group_size)
        else:
            outs = [
                matmul(x2d, layer.qweight[:, start:end], layer.scales[:, start:end],
                       layer.zeros[:, start:end], bits, group_size, layer.perm[part],
                       layer.row_group[part])
                for part, (start, end) in enumerate(_part_bounds(layer))
            ]
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def apply_with_epilogue(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, epilogue: Any
    ) -> torch.Tensor | None:
        """One decode row through the int4 one-row kernel with the epilogue
        (kernels/int4_half2.py); None for every other case."""
        if not layer.int_group_use_triton or self.scheme.act_order or bias is not None:
            return None
        from pagedllm.layers.quantization.kernels import int4_half2

        x2d = x.reshape(-1, x.shape[-1])
        k = x2d.shape[-1]
        if x2d.dtype != layer.scales.dtype or not int4_half2.supports(
            x2d.shape[0], k, self.scheme.bits, self.scheme.group_size, False, x2d.dtype
        ):
            return None
        out = int4_half2.int4_half2_gemv(x2d, layer.qweight, layer.scales, layer.zeros, self.scheme.group_size,
                                         layer.int_group_split_counts, epilogue=epilogue)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def dummy_g_idx(layer: nn.Module, param: torch.Tensor, group_size: int) -> None:
    """The in-order g_idx of this rank's rows (act order without reordering)."""
    rows = param.shape[-1]
    start = layer.tp_rank * rows if rows != layer.input_size else 0
    if group_size == -1:
        param.data.zero_()
    else:
        param.data.copy_((torch.arange(start, start + rows, device=param.device) // group_size).expand_as(param))


def dummy_fill(param: torch.Tensor, generator: torch.Generator, scale: float | None = None) -> None:
    """Random int32 words for packed integers, small positive values for scales."""
    if scale is None:
        param.data.copy_(torch.randint(-2**31, 2**31 - 1, param.shape, generator=generator,
                                       dtype=torch.int64, device=generator.device).to(torch.int32))
    else:
        param.data.uniform_(0.5 * scale, scale, generator=generator)
