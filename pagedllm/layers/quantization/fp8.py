"""fp8 (float8_e4m3fn) weights: quantized while loading a bf16/fp16/fp32 checkpoint
(`quantization="fp8"`, per-channel scales, dynamic per-token activations), or read from an fp8
checkpoint (`quantization_config.quant_method == "fp8"`, as written by vLLM's/HF's tools):

  {"quant_method": "fp8", "activation_scheme": "dynamic" | "static",
   "weight_block_size": [128, 128] (optional), "ignored_layers" / "modules_to_not_convert": [...]}

Per-tensor checkpoints hold `weight` (fp8), a scalar `weight_scale` and, when static, a scalar
`input_scale`; block-wise ones hold `weight_scale_inv` [ceil(out/bn), ceil(in/bk)] and quantize
activations per token and group of bk columns at run time.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pagedllm.layers.quantization.base import (
    LinearMethodBase,
    QuantizationConfig,
    TensorParallelUnits,
    UnquantizedLinearMethod,
    is_layer_ignored,
)
from pagedllm.layers.quantization.kernels.w8a8 import FP8_DTYPE
from pagedllm.layers.quantization.w8a8 import W8A8LinearMethod, W8A8Scheme

_ACTIVATION_SCHEMES = ("dynamic", "static")


class Fp8Config(QuantizationConfig):
    def __init__(
        self,
        is_checkpoint_fp8_serialized: bool = False,
        activation_scheme: str = "dynamic",
        weight_block_size: tuple[int, int] | None = None,
        ignored_layers: tuple[str, ...] = (),
    ) -> None:
        if activation_scheme not in _ACTIVATION_SCHEMES:
            raise ValueError(
                f"fp8 quantization_config has activation_scheme={activation_scheme!r}; use one of "
                f"{', '.join(map(repr, _ACTIVATION_SCHEMES))}."
            )
        if weight_block_size is not None:
            if not is_checkpoint_fp8_serialized:
                raise ValueError("weight_block_size needs an fp8 checkpoint (quant_method 'fp8').")
            if len(weight_block_size) != 2 or min(weight_block_size) < 1:
                raise ValueError(
                    f"fp8 quantization_config has weight_block_size={list(weight_block_size)}; "
                    "use two positive sizes, e.g. [128, 128]."
                )
            if activation_scheme != "dynamic":
                raise ValueError(
                    "fp8 block-wise checkpoints need activation_scheme='dynamic' (got 'static')."
                )
        if activation_scheme == "static" and not is_checkpoint_fp8_serialized:
            raise ValueError(
                "activation_scheme='static' needs input scales from an fp8 checkpoint; "
                "quantization='fp8' on an unquantized checkpoint is dynamic."
            )
        self.is_checkpoint_fp8_serialized = is_checkpoint_fp8_serialized
        self.activation_scheme = activation_scheme
        self.weight_block_size = tuple(weight_block_size) if weight_block_size else None
        self.ignored_layers = tuple(ignored_layers)

    def get_name(self) -> str:
        return "fp8"

    def tensor_parallel_units(self) -> TensorParallelUnits | None:
        if self.weight_block_size is None:
            return None
        block_n, block_k = self.weight_block_size
        return TensorParallelUnits(block_k, block_n, "weight_block_size")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Config:
        serialized = str(config.get("quant_method", "")).lower() == "fp8"
        block = config.get("weight_block_size")
        ignored = config.get("ignored_layers") or config.get("modules_to_not_convert") or ()
        return cls(
            is_checkpoint_fp8_serialized=serialized,
            activation_scheme=str(config.get("activation_scheme", "dynamic")),
            weight_block_size=tuple(int(n) for n in block) if block else None,  # type: ignore[arg-type]
            ignored_layers=tuple(ignored),
        )

    def scheme(self) -> W8A8Scheme:
        if self.weight_block_size is not None:
            return W8A8Scheme(
                FP8_DTYPE, "block", block_size=self.weight_block_size,
                activation_group_size=self.weight_block_size[1], weight_scale_name="weight_scale_inv",
            )
        if not self.is_checkpoint_fp8_serialized:
            return W8A8Scheme(FP8_DTYPE, "channel", quantize_while_loading=True)
        return W8A8Scheme(FP8_DTYPE, "tensor", activation_dynamic=self.activation_scheme == "dynamic")

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase:
        if is_layer_ignored(prefix, self.ignored_layers):
            return UnquantizedLinearMethod()
        return W8A8LinearMethod(self.scheme())
