"""Collectives over the tensor-parallel group; no-ops when there is one rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pagedllm.distributed.parallel_state import get_custom_all_reduce, get_tp_group, get_tp_size


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the ranks, which may be `x` summed in place or a new tensor: small
    messages (decode) through the peer-to-peer one-shot kernel when it is set up, the rest
    through NCCL (or gloo)."""
    if get_tp_size() == 1:
        return x
    custom = get_custom_all_reduce()
    if custom is not None and custom.accepts(x):
        return custom.all_reduce(x)
    dist.all_reduce(x, group=get_tp_group())
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order."""
    world_size = get_tp_size()
    if world_size == 1:
        return x
    x = x.contiguous()
    # The list form works on gloo and nccl alike; all_gather_into_tensor does not on every
    # gloo build.
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x, group=get_tp_group())
    return torch.cat(parts, dim=dim)
