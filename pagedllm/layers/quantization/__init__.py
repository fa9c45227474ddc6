"""Quantization methods by name, and the choice of one for a model.

A method is picked once per engine: from `quantization=` when given, else from the
checkpoint's `quantization_config` in config.json (its `quant_method`). Each name maps to the
`QuantizationConfig` subclass that reads that config and picks each layer's linear method; the
classes are imported only when used.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from pagedllm.layers.quantization.base import QuantizationConfig

logger = logging.getLogger(__name__)

# name -> "module:Class". A new scheme is one line here and one module beside this one.
QUANTIZATION_METHODS: dict[str, str] = {
    "fp8": "pagedllm.layers.quantization.fp8:Fp8Config",
    "compressed-tensors": "pagedllm.layers.quantization.compressed_tensors:CompressedTensorsConfig",
    "gptq": "pagedllm.layers.quantization.gptq:GPTQConfig",
    "awq": "pagedllm.layers.quantization.awq:AWQConfig",
}
# vLLM's names for its Marlin kernels of the same checkpoint formats, which vLLM users pass as
# quantization=; here they run pagedllm's own kernels for that format.
_KERNEL_NAMES = {"gptq-marlin": "gptq", "awq-marlin": "awq"}


def checkpoint_quant_config(hf_config: Any) -> dict[str, Any] | None:
    """The checkpoint's `quantization_config` as a plain dict (None when it has none)."""
    raw = getattr(hf_config, "quantization_config", None)
    if raw is None:
        return None
    return dict(raw) if isinstance(raw, dict) else dict(raw.to_dict())


def resolve_quantization(requested: str | None, hf_config: Any) -> str | None:
    """The method name this engine uses: `requested` (quantization=) checked against the
    checkpoint's, or the checkpoint's own. ValueError for an unknown or contradicting name."""
    checkpoint = checkpoint_quant_config(hf_config)
    checkpoint_method = None
    if checkpoint is not None:
        checkpoint_method = str(checkpoint.get("quant_method", "")).lower().replace("_", "-")
        if checkpoint_method not in QUANTIZATION_METHODS:
            raise ValueError(
                f"The checkpoint's quantization_config has quant_method={checkpoint_method!r}, "
                f"which is not supported; supported methods: {', '.join(QUANTIZATION_METHODS)}."
            )
    if requested is None:
        return checkpoint_method
    name = str(requested).lower().replace("_", "-")
    if name in _KERNEL_NAMES:
        logger.info("quantization=%r: the %r checkpoint format, run by pagedllm's own kernels.", requested,
                    _KERNEL_NAMES[name])
        name = _KERNEL_NAMES[name]
    if name not in QUANTIZATION_METHODS:
        raise ValueError(
            f"quantization={requested!r} is not supported; use one of "
            f"{', '.join(map(repr, QUANTIZATION_METHODS))} (or None to follow the checkpoint)."
        )
    if checkpoint_method is not None and checkpoint_method != name:
        raise ValueError(
            f"quantization={requested!r} contradicts the checkpoint, which is quantized with "
            f"{checkpoint_method!r} (its config.json quantization_config); pass "
            f"quantization={checkpoint_method!r} or leave it None."
        )
    return name


def get_quantization_config(method: str | None, hf_config: Any) -> QuantizationConfig | None:
    """The `QuantizationConfig` of `method` built from the checkpoint's quantization_config
    (an empty dict when the weights are quantized while loading, e.g. dynamic fp8)."""
    if method is None:
        return None
    checkpoint = checkpoint_quant_config(hf_config)
    logger.info(
        "Quantization %s: %s.", method,
        "from the checkpoint's quantization_config" if checkpoint else "weights quantized while loading",
    )
    return quantization_config_class(method).from_config(checkpoint or {})


def quantization_config_class(method: str) -> type[QuantizationConfig]:
    """The QuantizationConfig subclass of a method name (imported on first use)."""
    module_name, class_name = QUANTIZATION_METHODS[method].split(":")
    return getattr(importlib.import_module(module_name), class_name)


__all__ = [
    "QUANTIZATION_METHODS",
    "QuantizationConfig",
    "checkpoint_quant_config",
    "get_quantization_config",
    "quantization_config_class",
    "resolve_quantization",
]
