"""The linear method of every 8-bit weight scheme: fp8 (float8_e4m3fn) or int8 weights with
per-tensor, per-channel or block scales (their parameters and loading: w8a8_weights.py), and
activations quantized per token at run time, with a static per-tensor scale, per token and
column group, or not at all. It picks a kernel per layer (torch._scaled_mm, torch._int_mm, the
Triton GEMV for decode rows, or the dequantized reference) and runs it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.quantization.kernels.w8a8 import (
    FP8_DTYPE,
    fake_quantize_activation,
    int_mm_int8,
    quantize_activation,
    scaled_mm_fp8,
)
from pagedllm.layers.quantization.quantized_activation import QuantizedActivation
from pagedllm.layers.quantization.w8a8_weights import W8A8Scheme, W8A8Weights

__all__ = ["FP8_DTYPE", "W8A8LinearMethod", "W8A8Scheme"]


class W8A8LinearMethod(W8A8Weights):
    # ---- after loading ----------------------------------------------------------------
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.settle_scales(layer)
        layer.w8a8_kernel = self._choose_kernel(layer)
        if layer.w8a8_kernel in ("scaled_mm", "int_mm"):
            from pagedllm.layers.ops.split_k import split_count_buffer

            # The decode GEMV's split-K launches count their finished splits here.
            layer.gemv_split_counts = split_count_buffer(layer.weight.shape[0], layer.weight.device)

    def _choose_kernel(self, layer: nn.Module) -> str:
        weight = layer.weight
        scheme = self.scheme
        # Per-group activation scales vary along K, so they cannot scale a whole row's sums
        # after torch._scaled_mm / torch._int_mm: those layers take the reference path.
        if (weight.device.type != "cuda" or not scheme.activation_quantized or scheme.weight_strategy == "block"
                or scheme.activation_group_size is not None):
            return "reference"
        out_features, in_features = weight.shape
        if scheme.weight_dtype == FP8_DTYPE:
            fp8_capable = torch.cuda.get_device_capability(weight.device) >= (8, 9)
            return "scaled_mm" if fp8_capable and out_features % 16 == 0 and in_features % 16 == 0 else "reference"
        return "int_mm" if out_features % 8 == 0 and in_features % 8 == 0 else "reference"

    def fused_input_quantization(self, layer: nn.Module) -> torch.dtype | None:
        """fp8 (or int8) per token, from the producing kernel, for the torch._scaled_mm (or
        torch._int_mm) / GEMV paths with dynamic symmetric activations (static scales, zero
        points and the reference path quantize here)."""
        scheme = self.scheme
        dynamic_per_token = scheme.activation_dynamic and scheme.activation_group_size is None
        if not dynamic_per_token or hasattr(layer, "input_scale"):
            return None
        if layer.w8a8_kernel == "scaled_mm":
            return FP8_DTYPE
        if layer.w8a8_kernel == "int_mm" and scheme.activation_symmetric:
            return torch.int8
        return None

    # ---- compute ----------------------------------------------------------------------
    def apply(
        self, layer: nn.Module, x: torch.Tensor | QuantizedActivation, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if isinstance(x, QuantizedActivation):
            return _apply_quantized_input(layer, x, bias)
        scheme = self.scheme
        x2 = x.reshape(-1, x.shape[-1])
        input_scale = getattr(layer, "input_scale", None)
        input_zero_point = getattr(layer, "input_zero_point", None)
        decode_out = None
        if self._has_decode_gemv(layer):
            decode_out = _decode_gemv(x2, layer, bias, input_scale)
        if decode_out is not None:
            out = decode_out
        elif layer.w8a8_kernel == "scaled_mm":
            if input_scale is None:
                x_q, x_scale = _per_token_quant(x2, FP8_DTYPE)
            else:
                x_q, x_scale, _ = quantize_activation(x2, FP8_DTYPE, input_scale, None, True, None)
            out = scaled_mm_fp8(x_q, x_scale, layer.weight, layer.weight_scale, bias, x.dtype)
        elif layer.w8a8_kernel == "int_mm":
            if input_scale is None and scheme.activation_symmetric:
                (x_q, x_scale), x_zero_point = _per_token_quant(x2, torch.int8), None
            else:
                x_q, x_scale, x_zero_point = quantize_activation(
                    x2, torch.int8, input_scale, input_zero_point, scheme.activation_symmetric, None
                )
            out = int_mm_int8(
                x_q, x_scale, x_zero_point, layer.weight, layer.weight_scale,
                None if x_zero_point is None else self._weight_row_sums(layer), bias, x.dtype,
            )
        else:
            if scheme.activation_quantized:
                x2 = fake_quantize_activation(
                    x2, scheme.weight_dtype, input_scale, input_zero_point,
                    scheme.activation_symmetric, scheme.activation_group_size,
                )
            out = F.linear(x2, self.dequantized_weight(layer, x.dtype), bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def apply_with_epilogue(
        self, layer: nn.Module, x: torch.Tensor | QuantizedActivation, bias: torch.Tensor | None, epilogue: Any
    ) -> torch.Tensor | None:
        """Decode rows through the GEMV with the epilogue (ops/gemv.py); None on the other
        paths."""
        if isinstance(x, QuantizedActivation):
            return _apply_quantized_input(layer, x, bias, epilogue)
        if not self._has_decode_gemv(layer):
            return None
        x2 = x.reshape(-1, x.shape[-1])
        out = _decode_gemv(x2, layer, bias, getattr(layer, "input_scale", None), epilogue)
        return None if out is None else out.reshape(*x.shape[:-1], out.shape[-1])

    def _has_decode_gemv(self, layer: nn.Module) -> bool:
        """Whether decode rows of a plain-tensor input may take the Triton GEMV: fp8 layers,
        and int8 ones with symmetric activations."""
        return layer.w8a8_kernel == "scaled_mm" or (layer.w8a8_kernel == "int_mm" and self.scheme.activation_symmetric)

    @staticmethod
    def _weight_row_sums(layer: nn.Module) -> torch.Tensor:
        """Sum of each int8 weight row, computed at the first forward (the profiling run, before
        any CUDA graph capture), not after loading: a sharded state overwrites the weights
        after process_weights_after_loading."""
        sums = getattr(layer, "weight_row_sums", None)
        if sums is None:
            sums = layer.weight.float().sum(1)
            layer.register_buffer("weight_row_sums", sums, persistent=False)
        return sums


def _per_token_quant(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Imported here: the Triton module is only wanted on the GPU paths.
    from pagedllm.layers.quantization.kernels.per_token_quant import per_token_quant

    return per_token_quant(x, qdtype)


def _decode_gemv(x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None,
                 input_scale: torch.Tensor | None, epilogue: Any = None) -> torch.Tensor | None:
    """Decode rows (1-8) of an fp8 layer, or of an int8 one with symmetric activations, through
    the Triton GEMV (layers/ops/gemv.py: it reads 8-bit weights faster than torch._scaled_mm
    and torch._int_mm at these sizes); None where it does not apply."""
    from pagedllm.layers.ops.gemv import gemv, should_use_gemv

    if not should_use_gemv(x, layer.weight):
        return None
    return gemv(x, layer.weight, bias, weight_scale=layer.weight_scale, input_scale=input_scale,
                split_counts=layer.gemv_split_counts, epilogue=epilogue)


def _apply_quantized_input(layer: nn.Module, x: QuantizedActivation, bias: torch.Tensor | None,
                           epilogue: Any = None) -> torch.Tensor | None:
    """An input its producer quantized per token (see fused_input_quantization): decode rows
    through the GEMV's 8-bit tensor-core dots, the rest through torch._scaled_mm (fp8) or
    torch._int_mm (int8). With an epilogue (ops/epilogue.py): the GEMV with it, or None for
    more rows."""
    from pagedllm.layers.ops.gemv import MAX_GEMV_ROWS, gemv

    x_q = x.data.reshape(-1, x.data.shape[-1])
    if 0 < x_q.shape[0] <= MAX_GEMV_ROWS:
        out = gemv(x_q, layer.weight, bias, weight_scale=layer.weight_scale, input_scale=x.scale, out_dtype=x.dtype,
                   split_counts=layer.gemv_split_counts, epilogue=epilogue)
    elif epilogue is not None:
        return None
    elif x_q.dtype == torch.int8:
        out = int_mm_int8(x_q, x.scale.reshape(-1, 1), None, layer.weight, layer.weight_scale, None, bias, x.dtype)
    else:
        out = scaled_mm_fp8(x_q, x.scale.reshape(-1, 1), layer.weight, layer.weight_scale, bias, x.dtype)
    return out.reshape(*x.data.shape[:-1], out.shape[-1])
