"""`cpu_offload_gb`: weights beyond a GPU budget live in pinned host memory and are copied to
the device right before the module that owns them runs, then dropped again.

Modules are offloaded in model order (vocabulary matrices excepted) until `cpu_offload_bytes`
of parameters have moved; a
forward pre-hook copies a module's own parameters in (non-blocking from pinned memory, so the
copy of one layer overlaps the previous layer's kernels), a forward hook points them back at
the host copies so the device memory is freed as soon as the layer is done. CUDA graphs are
off with offloading (a graph would bake in the device addresses of one step's copies).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _own_parameters(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


def offload_weights_to_cpu(model: nn.Module, budget_bytes: int, device: torch.device) -> int:
    """Moves parameters to pinned host memory, module by module, until budget_bytes are moved.
    Returns the bytes moved."""
    if budget_bytes <= 0:
        return 0
    if device.type != "cuda":
        raise ValueError(f"cpu_offload_gb needs a CUDA device (weights stream from host to GPU), got {device}.")
    from pagedllm.layers.vocab_embedding import VocabParallelEmbedding

    moved = 0
    num_modules = 0
    for module in model.modules():
        params = _own_parameters(module)
        # Vocabulary matrices are read outside their own forward (the LM head by
        # compute_logits, a tied embedding by both), where no hook would copy them in.
        if not params or moved >= budget_bytes or isinstance(module, VocabParallelEmbedding):
            continue
        host_copies = []
        for param in params:
            host = torch.empty(param.shape, dtype=param.dtype, pin_memory=True)
            host.copy_(param.data)
            param.data = host
            host_copies.append(host)
            moved += host.numel() * host.element_size()
        module.register_forward_pre_hook(_make_copy_in(params, host_copies, device))
        module.register_forward_hook(_make_release(params, host_copies))
        num_modules += 1
    torch.cuda.empty_cache()
    logger.info(
        "cpu_offload_gb: %.2f GiB of weights in %d modules live in pinned host memory and stream "
        "to the GPU at each forward.", moved / (1 << 30), num_modules,
    )
    return moved


def _make_copy_in(params: list[nn.Parameter], host_copies: list[torch.Tensor], device: torch.device):
    def copy_in(module: nn.Module, args: tuple) -> None:
        for param, host in zip(params, host_copies):
            param.data = host.to(device, non_blocking=True)

    return copy_in


def _make_release(params: list[nn.Parameter], host_copies: list[torch.Tensor]):
    def release(module: nn.Module, args: tuple, output: object) -> None:
        # The caching allocator keeps the device copy alive until the kernels queued on it
        # have run (same stream), so pointing back at the host copy is safe right away.
        for param, host in zip(params, host_copies):
            param.data = host

    return release
