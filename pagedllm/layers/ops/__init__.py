"""Triton kernels for the small per-token layers: RMSNorm (with the residual add fused),
rotary embedding and SiLU-and-mul. Each replaces a chain of ~5 elementwise torch kernels with
one launch; the torch code in layers/ stays as the reference they are tested against.

Importing this package needs no Triton; its kernel modules do, so layers import them only
after `triton_ops_available` says yes.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Kernels run under Triton's interpreter (the CPU tests). Its casts round differently from a
GPU's (float32 -> fp8 loses the carry into the exponent, float32 -> bf16 truncates) and it has
no inline assembly, so kernels take this as a constexpr and do those steps their own way."""


# Cached so the decision (and its warning) happens once per device type, not once per layer.
@functools.cache
def triton_ops_available(device_type: str) -> bool:
    """Whether layers built on `device_type` ("cuda", "cpu", ...) should run the Triton
    kernels: on CUDA when Triton imports, never elsewhere."""
    if device_type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError as error:
        logger.warning(
            "Triton is unavailable (%s); RMSNorm, rope and SiLU run as unfused torch ops on cuda.", error
        )
        return False
    return True


def num_sms(device: torch.device) -> int:
    """The SM count of a CUDA device, which sizes split-K and decode-split grids; 8 elsewhere
    (Triton's interpreter on CPU tensors, where any count works)."""
    if device.type != "cuda":
        return 8
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or on CUDA at decode sizes (1-8 rows) the Triton GEMV (ops/gemv.py), which
    reads the weight closer to the bandwidth limit than cuBLAS on every Llama-3.1-8B shape."""
    out = dense_linear_with_epilogue(x, weight, bias, None)
    return F.linear(x, weight, bias) if out is None else out


def dense_linear_with_epilogue(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, epilogue: Any
) -> torch.Tensor | None:
    """The Triton GEMV of x @ weight.T (+ bias) followed by `epilogue` (an ops/epilogue.py
    Epilogue, or None) as one launch, where the GEMV applies; None elsewhere (the caller then
    runs F.linear and the op the epilogue stands for)."""
    if x.is_cuda and triton_ops_available("cuda"):
        from pagedllm.layers.ops.gemv import gemv, should_use_gemv

        if weight.dtype == x.dtype and should_use_gemv(x, weight):
            return gemv(x, weight, bias, epilogue=epilogue)
    return None
