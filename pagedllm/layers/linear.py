"""Linear layers that own their tensor-parallel split and their weight loading.

Column-parallel layers split the output features across ranks (each rank computes a slice of
the output); row-parallel layers split the input features and sum the partial outputs with an
all-reduce. Every parameter's `weight_loader(param, loaded_weight, shard_id=None)` takes the
FULL checkpoint tensor (or a lazily sliceable safetensors slice) and copies this rank's slice.
The math itself lives in the layer's `quant_method` (see quantization/base.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pagedllm.distributed.communication import (
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from pagedllm.distributed.parallel_state import get_tp_rank, get_tp_size
from pagedllm.layers.ops.epilogue import RopeEpilogue, SiluAndMulEpilogue
from pagedllm.layers.quantization.base import (
    LoadedWeight,
    QuantizationConfig,
    UnquantizedLinearMethod,
    copy_loaded_weight,
    narrow_loaded_weight,
    set_weight_attrs,
)

if TYPE_CHECKING:
    from pagedllm.layers.rotary_embedding import RotaryEmbedding


def divide_for_tp(numerator: int, tp_size: int, what: str) -> int:
    if numerator % tp_size:
        raise ValueError(
            f"{what} ({numerator}) must be divisible by tensor_parallel_size ({tp_size}); "
            "use a tensor_parallel_size that divides it."
        )
    return numerator // tp_size


def _packed(param: torch.Tensor, dim: int, size: int) -> int:
    """`size` logical elements along `dim`, in stored elements of a packed parameter."""
    if getattr(param, "packed_dim", None) == dim:
        return size // param.pack_factor
    return size


class LinearBase(nn.Module):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.prefix = prefix
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.params_dtype = torch.get_default_dtype()
        self.quant_method = (
            quant_config.get_linear_method(self, prefix)
            if quant_config is not None
            else UnquantizedLinearMethod()
        )

    def _create_weights(
        self, input_size_per_partition: int, output_partition_sizes: list[int], bias: bool,
        bias_output_dim: int | None,
    ) -> None:
        self.input_size_per_partition = input_size_per_partition
        self.output_partition_sizes = output_partition_sizes
        self.quant_method.create_weights(
            self, input_size_per_partition, output_partition_sizes,
            self.input_size, self.output_size, self.params_dtype,
        )
        if bias:
            self.bias = nn.Parameter(
                torch.empty(sum(output_partition_sizes), dtype=self.params_dtype),
                requires_grad=False,
            )
            set_weight_attrs(self.bias, {"output_dim": bias_output_dim})
        else:
            self.register_parameter("bias", None)
        for param in self.parameters(recurse=False):
            if not hasattr(param, "weight_loader"):
                param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: Any = None) -> None:
        raise NotImplementedError


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False,
        quant_config: QuantizationConfig | None = None, prefix: str = "",
    ) -> None:
        super().__init__(input_size, output_size, quant_config, prefix)
        self._create_weights(input_size, [output_size], bias, bias_output_dim=0)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: Any = None) -> None:
        copy_loaded_weight(param.data, loaded, self.prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; `gather_output` concatenates them afterwards."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False,
        quant_config: QuantizationConfig | None = None, prefix: str = "",
    ) -> None:
        super().__init__(input_size, output_size, quant_config, prefix)
        self.gather_output = gather_output
        self._create_weights(input_size, self._output_partition_sizes(), bias, bias_output_dim=0)

    def _output_partition_sizes(self) -> list[int]:
        return [divide_for_tp(self.output_size, self.tp_size, f"{self.prefix} output size")]

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: Any = None) -> None:
        _copy_rank_slice(param, loaded, getattr(param, "output_dim", None), self.tp_rank, self.prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, self.bias)
        if self.gather_output:
            out = tensor_model_parallel_all_gather(out, dim=-1)
        return out


class _FusedColumnParallelLinear(ColumnParallelLinear):
    """Several checkpoint matrices stacked along the output dimension, each split by rank.
    Subclasses say where shard `shard_id` sits in this rank's parameter and in the checkpoint."""

    def _shard_placement(self, shard_id: Any) -> tuple[int, int, int]:
        """(offset in this rank's parameter, size, offset in the checkpoint tensor), logical."""
        raise NotImplementedError

    def _full_shard_sizes(self) -> list[tuple[Any, int]]:
        """(shard id, full checkpoint size) for each part, in stacking order."""
        raise NotImplementedError

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: Any = None) -> None:
        output_dim = getattr(param, "output_dim", None)
        if shard_id is None:
            if output_dim is None:
                copy_loaded_weight(param.data, loaded, self.prefix)
                return
            # The checkpoint already stores the parts fused: split it and load each part.
            offset = 0
            for part_id, full_size in self._full_shard_sizes():
                size = _packed(param, output_dim, full_size)
                self.weight_loader(param, narrow_loaded_weight(loaded, output_dim, offset, size), part_id)
                offset += size
            return
        if output_dim is None:
            raise ValueError(
                f"{self.prefix}: a parameter without output_dim cannot take shard {shard_id!r}; "
                "its quantization method must give it its own weight_loader."
            )
        param_offset, size, loaded_offset = (
            _packed(param, output_dim, n) for n in self._shard_placement(shard_id)
        )
        dst = param.data.narrow(output_dim, param_offset, size)
        copy_loaded_weight(dst, narrow_loaded_weight(loaded, output_dim, loaded_offset, size),
                           f"{self.prefix} shard {shard_id!r}")


class MergedColumnParallelLinear(_FusedColumnParallelLinear):
    """Matrices of sizes `output_sizes` (e.g. gate and up) in one layer; shard ids 0, 1, ..."""

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False,
        gather_output: bool = False, quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, gather_output, quant_config, prefix)

    def _output_partition_sizes(self) -> list[int]:
        return [
            divide_for_tp(size, self.tp_size, f"{self.prefix} output size {i}")
            for i, size in enumerate(self.output_sizes)
        ]

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of this layer's two equal parts (gate, up) in one kernel, where the
        quantization method has one for x (decode rows on the GPU); None otherwise, and the
        caller applies SiluAndMul to forward()'s output."""
        if self.gather_output or len(self.output_sizes) != 2 or self.output_sizes[0] != self.output_sizes[1]:
            return None
        return self.quant_method.apply_with_epilogue(self, x, self.bias, SiluAndMulEpilogue())

    def _full_shard_sizes(self) -> list[tuple[Any, int]]:
        return list(enumerate(self.output_sizes))

    def _shard_placement(self, shard_id: Any) -> tuple[int, int, int]:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(
                f"{self.prefix}: shard_id={shard_id!r}; use 0..{len(self.output_sizes) - 1}."
            )
        size = self.output_partition_sizes[shard_id]
        return sum(self.output_partition_sizes[:shard_id]), size, self.tp_rank * size


class QKVParallelLinear(_FusedColumnParallelLinear):
    """Query, key and value projections in one layer; shard ids "q", "k", "v".

    Query heads are split across ranks. Key/value heads are split too, unless there are fewer
    of them than ranks: then each rank holds the one key/value head its query heads use.
    """

    def __init__(
        self, hidden_size: int, head_size: int, total_num_heads: int,
        total_num_kv_heads: int | None = None, bias: bool = False,
        quant_config: QuantizationConfig | None = None, prefix: str = "",
    ) -> None:
        tp_size = get_tp_size()
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide_for_tp(total_num_heads, tp_size, "num_attention_heads")
        if tp_size >= total_num_kv_heads:
            if tp_size % total_num_kv_heads:
                raise ValueError(
                    f"tensor_parallel_size ({tp_size}) must be a multiple of num_key_value_heads "
                    f"({total_num_kv_heads}) when it is larger; use a divisor or multiple of it."
                )
            self.num_kv_heads = 1
            self.num_kv_head_replicas = tp_size // total_num_kv_heads
        else:
            self.num_kv_heads = divide_for_tp(total_num_kv_heads, tp_size, "num_key_value_heads")
            self.num_kv_head_replicas = 1
        output_size = (total_num_heads + 2 * total_num_kv_heads) * head_size
        super().__init__(hidden_size, output_size, bias, False, quant_config, prefix)

    def _output_partition_sizes(self) -> list[int]:
        kv_size = self.num_kv_heads * self.head_size
        return [self.num_heads * self.head_size, kv_size, kv_size]

    def forward_rotated(
        self, x: torch.Tensor, rotary_emb: RotaryEmbedding, positions: torch.Tensor
    ) -> torch.Tensor | None:
        """This layer's output with rotary_emb applied to its q and k heads, in one kernel, where
        the quantization method has one for x (decode rows on the GPU) and the rope is a
        plain one over whole heads; None otherwise, and the caller applies rotary_emb to
        forward()'s q and k."""
        if positions.dim() != 1 or rotary_emb.rotary_dim != self.head_size:
            return None
        epilogue = RopeEpilogue(positions, rotary_emb.cos_cache, rotary_emb.sin_cache, self.head_size,
                                rotated_columns=(self.num_heads + self.num_kv_heads) * self.head_size)
        return self.quant_method.apply_with_epilogue(self, x, self.bias, epilogue)

    def _full_shard_sizes(self) -> list[tuple[Any, int]]:
        kv_size = self.total_num_kv_heads * self.head_size
        return [("q", self.total_num_heads * self.head_size), ("k", kv_size), ("v", kv_size)]

    def _shard_placement(self, shard_id: Any) -> tuple[int, int, int]:
        q_size = self.num_heads * self.head_size
        kv_size = self.num_kv_heads * self.head_size
        kv_rank = self.tp_rank // self.num_kv_head_replicas
        if shard_id == "q":
            return 0, q_size, self.tp_rank * q_size
        if shard_id == "k":
            return q_size, kv_size, kv_rank * kv_size
        if shard_id == "v":
            return q_size + kv_size, kv_size, kv_rank * kv_size
        raise ValueError(f"{self.prefix}: shard_id={shard_id!r}; use 'q', 'k' or 'v'.")


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed by an all-reduce."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False,
        input_is_parallel: bool = True, reduce_results: bool = True,
        quant_config: QuantizationConfig | None = None, prefix: str = "",
    ) -> None:
        super().__init__(input_size, output_size, quant_config, prefix)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        input_size_per_partition = divide_for_tp(input_size, self.tp_size, f"{prefix} input size")
        # The bias is not split: every rank holds it and only rank 0 adds it.
        self._create_weights(input_size_per_partition, [output_size], bias, bias_output_dim=None)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: Any = None) -> None:
        _copy_rank_slice(param, loaded, getattr(param, "input_dim", None), self.tp_rank, self.prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and self.tp_size > 1:
            size = self.input_size_per_partition
            x = x.narrow(-1, self.tp_rank * size, size)
        # Added on rank 0 only, so the sum over ranks holds it once.
        bias = self.bias if self.tp_rank == 0 else None
        out = self.quant_method.apply(self, x, bias)
        if self.reduce_results and self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out


def _copy_rank_slice(param: nn.Parameter, loaded: LoadedWeight, split_dim: int | None, tp_rank: int, name: str) -> None:
    """Copies rank tp_rank's equal slice of `loaded` along split_dim (the whole tensor when the
    parameter is not split)."""
    if split_dim is not None:
        size = param.shape[split_dim]
        loaded = narrow_loaded_weight(loaded, split_dim, tp_rank * size, size)
    copy_loaded_weight(param.data, loaded, name)
