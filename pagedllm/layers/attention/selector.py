"""Chooses the attention implementation once, from the device and dtype."""

from __future__ import annotations

import functools
import logging

import torch

from pagedllm.layers.attention.backends.base import AttentionImpl
from pagedllm.layers.attention.backends.torch_sdpa import TorchSDPAAttention

logger = logging.getLogger(__name__)


# Cached so the choice (and its warning) happens once, not once per layer.
@functools.cache
def get_attn_backend(device: torch.device, dtype: torch.dtype) -> type[AttentionImpl]:
    """The implementation class for `device`: the Triton paged kernels on CUDA, the torch SDPA
    reference elsewhere (and on CUDA when Triton cannot be imported)."""
    if torch.device(device).type == "cuda":
        try:
            from pagedllm.layers.attention.backends.triton_paged import TritonPagedAttention
        except ImportError as error:
            logger.warning(
                "Triton paged attention is unavailable (%s); using the slower torch SDPA "
                "attention on %s.", error, device,
            )
        else:
            return TritonPagedAttention
    return TorchSDPAAttention
