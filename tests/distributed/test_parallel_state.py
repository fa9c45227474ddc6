"""The ranks' rendezvous: with `hosted_store`, every rank is a client of a store another process
(the executor) hosts, so a rank that arrives before rank 0 finds it listening instead of backing
off (parallel_state.host_store)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

from pagedllm.distributed.parallel_state import host_store, init_distributed
from pagedllm.executor.base import get_open_port


def _rank_main(rank: int, port: int) -> None:
    from pagedllm.distributed.parallel_state import destroy_distributed, get_tp_group

    if rank == 0:
        time.sleep(0.2)  # rank 1 arrives first, before anything rank 0 would have served
    init_distributed(2, rank, "gloo", f"tcp://127.0.0.1:{port}", hosted_store=True)
    try:
        summed = torch.tensor([float(rank + 1)])
        torch.distributed.all_reduce(summed, group=get_tp_group())
        assert summed.item() == 3.0
    finally:
        destroy_distributed()


def test_ranks_meet_at_the_store_the_executor_hosts() -> None:
    port = get_open_port()
    store = host_store(port, world_size=2)
    keys_before = store.num_keys()
    mp.start_processes(_rank_main, args=(port,), nprocs=2, join=True, start_method="spawn")
    # The group's keys went to this process's store: no rank hosted one of its own.
    assert store.num_keys() > keys_before


def test_a_hosted_store_needs_a_tcp_address() -> None:
    with pytest.raises(ValueError, match="tcp://host:port"):
        init_distributed(2, 0, "gloo", "file:///tmp/rendezvous", hosted_store=True)
