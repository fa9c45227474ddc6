"""This process's place in the tensor-parallel group.

Tensor parallelism is the only parallelism, so the tensor-parallel group is the whole world.
The state is set once per process by the worker (`init_distributed`) and read by the layers
when they size their shards; without it a process is rank 0 of 1. It is module-level state by
necessity (one process, one rank), kept in one frozen record so it is replaced, never mutated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _TensorParallelState:
    rank: int
    world_size: int
    group: dist.ProcessGroup | None
    """None when world_size is 1 (no process group is created) or in test overrides."""
    custom_all_reduce: Any = None
    """The peer-to-peer all-reduce for small messages (symm_mem_all_reduce.py), or None: NCCL."""


_tp_state: _TensorParallelState | None = None


def init_distributed(
    world_size: int, rank: int, backend: str, init_method: str, local_rank: int = 0, *, hosted_store: bool = False
) -> None:
    """Join the process group of `world_size` ranks ("nccl" on CUDA, "gloo" on CPU).

    A single rank creates no process group: every collective is then a no-op. With
    `hosted_store`, another process (the executor) hosts the TCP store at `init_method`
    ("tcp://host:port") and every rank connects to it as a client; otherwise rank 0 hosts it.
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
            if hosted_store:
                store = _client_store(init_method, world_size)
                dist.init_process_group(backend=backend, store=store, world_size=world_size, rank=rank)
            else:
                dist.init_process_group(
                    backend=backend, init_method=init_method, world_size=world_size, rank=rank
                )
        group = dist.group.WORLD
        logger.info("Rank %d of %d joined the %s process group.", rank, world_size, backend)
    _tp_state = _TensorParallelState(rank=rank, world_size=world_size, group=group)


def _client_store(init_method: str, world_size: int) -> dist.TCPStore:
    """A client of the TCP store another process hosts at `init_method`."""
    address = urllib.parse.urlparse(init_method)
    if address.scheme != "tcp" or address.hostname is None or address.port is None:
        raise ValueError(f"A hosted store is reached at tcp://host:port; got init_method={init_method!r}.")
    return dist.TCPStore(address.hostname, address.port, world_size, is_master=False, wait_for_workers=False)


def host_store(port: int, world_size: int) -> dist.TCPStore:
    """The TCP store the ranks of `init_distributed(..., hosted_store=True)` meet at,
    tcp://127.0.0.1:`port`, served by this process while the returned object lives.

    When rank 0 hosts the store, a rank that connects before rank 0 listens backs off and
    retries 0.3-0.7 s later (measured with torch 2.11 and 2.13), which decides a two-rank
    start-up's join time at random. A store that is up before any rank asks has no such wait."""
    return dist.TCPStore("127.0.0.1", port, world_size, is_master=True, wait_for_workers=False)


def init_custom_all_reduce(device: torch.device, disable: bool) -> None:
    """Sets up the one-shot peer-to-peer all-reduce for small (decode) messages on CUDA, unless
    disabled; every rank must succeed or all fall back to NCCL (the ranks must agree, or their
    collectives would not match)."""
    global _tp_state
    if _tp_state is None or _tp_state.group is None or device.type != "cuda" or disable:
        return
    from pagedllm.distributed.symm_mem_all_reduce import SymmMemAllReduce

    all_reduce = None
    try:
        all_reduce = SymmMemAllReduce(_tp_state.group, device)
    except Exception as error:  # no peer access, an old driver, a torch without symm_mem
        logger.warning("The peer-to-peer all-reduce is unavailable (%s); every all-reduce uses NCCL.", error)
    ok = torch.tensor([1 if all_reduce is not None else 0], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=_tp_state.group)
    if int(ok.item()) == 0:
        all_reduce = None
    else:
        logger.info("All-reduces up to %d KiB use the symmetric-memory one-shot kernel; larger ones NCCL. "
                    "Those of up to %d rows that a residual add and RMSNorm follow run fused with them: %s.",
                    all_reduce.max_bytes >> 10, all_reduce.max_fused_rows, all_reduce.fuses_norms)
    _tp_state = dataclasses.replace(_tp_state, custom_all_reduce=all_reduce)


def get_custom_all_reduce() -> Any:
    return None if _tp_state is None else _tp_state.custom_all_reduce


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
