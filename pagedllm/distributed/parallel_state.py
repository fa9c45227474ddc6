"""This process's place in the tensor-parallel group.

Tensor parallelism is the only parallelism, so the tensor-parallel group is the whole world.
The state is set once per process by the worker (`init_distributed`) and read by the layers
when they size their shards; without it a process is rank 0 of 1. It is module-level state by
necessity (one process, one rank), kept in one frozen record so it is replaced, never mutated.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _TensorParallelState:
    rank: int
    world_size: int
    group: dist.ProcessGroup | None
    """None when world_size is 1 (no process group is created) or in test overrides."""


_tp_state: _TensorParallelState | None = None


def init_distributed(
    world_size: int, rank: int, backend: str, init_method: str, local_rank: int = 0
) -> None:
    """Join the process group of `world_size` ranks ("nccl" on CUDA, "gloo" on CPU).

    A single rank creates no process group: every collective is then a no-op.
    """
    global _tp_state
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank={rank} must be in [0, world_size) with world_size >= 1, got world_size={world_size}."
        )
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend={backend!r} is not supported; use 'nccl' (CUDA) or 'gloo' (CPU).")
    if _tp_state is not None:
        if (_tp_state.rank, _tp_state.world_size) == (rank, world_size):
            return
        raise RuntimeError(
            f"Distributed state is already rank {_tp_state.rank} of {_tp_state.world_size}; "
            "call destroy_distributed() first."
        )
    group = None
    if world_size > 1:
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend, init_method=init_method, world_size=world_size, rank=rank
            )
        group = dist.group.WORLD
        logger.info("Rank %d of %d joined the %s process group.", rank, world_size, backend)
    _tp_state = _TensorParallelState(rank=rank, world_size=world_size, group=group)


def destroy_distributed() -> None:
    global _tp_state
    if _tp_state is not None and _tp_state.group is not None and dist.is_initialized():
        dist.destroy_process_group()
    _tp_state = None


def get_tp_rank() -> int:
    return 0 if _tp_state is None else _tp_state.rank


def get_tp_size() -> int:
    return 1 if _tp_state is None else _tp_state.world_size


def get_tp_group() -> dist.ProcessGroup | None:
    return None if _tp_state is None else _tp_state.group


@contextlib.contextmanager
def override_tp_state_for_testing(rank: int, world_size: int) -> Iterator[None]:
    """Make layers built inside this block shard themselves as `rank` of `world_size`, without
    processes, so tests can check the slicing math; collectives must not run inside it."""
    global _tp_state
    previous = _tp_state
    _tp_state = _TensorParallelState(rank=rank, world_size=world_size, group=None)
    try:
        yield
    finally:
        _tp_state = previous
