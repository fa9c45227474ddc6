"""The multiprocessing executor (one CPU process per rank, gloo; spawned unless
PAGEDLLM_WORKER_MULTIPROC_METHOD=fork): a worker's exception comes back with the worker's
traceback, a worker killed mid-run becomes a clear error instead of a hang, no worker process
outlives its LLM (garbage collection, interpreter exit, or the engine's process being killed
outright), and forked ranks compute what spawned ones do."""

from __future__ import annotations

import gc
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.worker import worker as worker_module
from pagedllm.executor import multiproc
from pagedllm.executor.base import RemoteTraceback, WorkerDiedError

ENGINE = dict(skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 24, tensor_parallel_size=2)
PROMPTS = [{"prompt_token_ids": [5, 17, 99, 23, 8]}, {"prompt_token_ids": list(range(30, 60))}]
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _still_alive_after(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if _alive(pid)]


def test_worker_exceptions_carry_their_traceback_and_workers_exit_on_garbage_collection(tiny_checkpoints):
    llm = LLM(str(tiny_checkpoints["llama"]), **ENGINE)
    executor = llm.llm_engine.executor
    pids = executor.worker_pids
    assert len(pids) == 2 and os.getpid() not in pids and all(_alive(pid) for pid in pids)
    assert executor.collective_rpc("get_pid") == pids

    with pytest.raises(AttributeError, match="no_such_method") as info:
        executor.collective_rpc("no_such_method")
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "Traceback" in str(info.value.__cause__) and "_worker_main" in str(info.value.__cause__)
    del info, executor

    # Every rank answered, so the engine is still usable.
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outputs)

    # The same finalizer runs at interpreter exit (multiprocessing also terminates its daemon
    # children then), so an LLM never shut down leaves no workers behind either.
    assert llm.llm_engine.executor._finalizer.atexit
    del llm, outputs
    gc.collect()
    # The finalizer joins the processes before it returns; allow a moment for the reaping.
    assert _still_alive_after(pids, timeout_s=2.0) == []


@pytest.mark.timeout(120)
def test_a_worker_killed_mid_run_raises_instead_of_hanging(tiny_checkpoints, monkeypatch):
    llm = LLM(str(tiny_checkpoints["llama"]), **ENGINE)
    executor = llm.llm_engine.executor
    pids = executor.worker_pids
    steps = itertools.count()
    execute_model = executor.execute_model

    def kill_rank_1_at_step_3(scheduler_output):
        if next(steps) == 3:
            os.kill(pids[1], signal.SIGKILL)
        return execute_model(scheduler_output)

    monkeypatch.setattr(executor, "execute_model", kill_rank_1_at_step_3)
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match=rf"Worker rank 1 \(pid {pids[1]}\) died with signal SIGKILL"):
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert time.monotonic() - start < 30
    # Rank 0, possibly blocked in an all-reduce with the dead rank, was stopped too.
    assert _still_alive_after(pids, timeout_s=5.0) == []
    with pytest.raises(RuntimeError, match="stopped after an earlier failure"):
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    llm.shutdown()


_SCRIPT = """
import os, signal, sys
from pagedllm import LLM

if __name__ == "__main__":
    llm = LLM(sys.argv[1], skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 24,
              tensor_parallel_size=2)
    print(" ".join(map(str, llm.llm_engine.executor.worker_pids)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no finalizer, no atexit: the workers are on their own
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_workers_exit_when_the_engine_process_is_killed(tiny_checkpoints, tmp_path, start_method):
    script = tmp_path / "engine.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_checkpoints["llama"])], capture_output=True, text=True, timeout=100,
        env={**os.environ, "PAGEDLLM_WORKER_MULTIPROC_METHOD": start_method},
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    pids = [int(pid) for pid in result.stdout.split()]
    assert len(pids) == 2
    # Each worker watches its parent's sentinel and exits as soon as it closes.
    assert _still_alive_after(pids, timeout_s=10.0) == []


def _torch_threads(worker) -> int:
    return torch.get_num_threads()


@pytest.mark.timeout(120)
def test_forked_ranks_start_at_once_run_one_thread_and_give_the_spawned_ranks_tokens(
    tiny_checkpoints, monkeypatch, caplog
):
    monkeypatch.setenv("PAGEDLLM_WORKER_MULTIPROC_METHOD", "spawn")
    spawned = LLM(str(tiny_checkpoints["llama"]), **ENGINE)
    expected = [o.outputs[0].token_ids for o in spawned.generate(PROMPTS, PARAMS, use_tqdm=False)]
    spawned.shutdown()

    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")  # vLLM's name is an alias
    monkeypatch.delenv("PAGEDLLM_WORKER_MULTIPROC_METHOD")
    # This process's OpenMP pool is busy with two threads, and the ranks would take four each
    # if they split the cores: a forked rank that ran more than one thread would hang.
    monkeypatch.setattr(worker_module, "_num_usable_cpus", lambda: 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        matrix = torch.randn(512, 512)
        (matrix @ matrix).sum()
        with caplog.at_level("INFO", logger="pagedllm"):
            forked = LLM(str(tiny_checkpoints["llama"]), **ENGINE)
    finally:
        torch.set_num_threads(threads)
    assert "Started 2 worker processes (fork" in caplog.text
    assert forked.llm_engine.executor.collective_rpc("run_callable", (_torch_threads,)) == [1, 1]
    assert [o.outputs[0].token_ids for o in forked.generate(PROMPTS, PARAMS, use_tqdm=False)] == expected
    forked.shutdown()


def test_the_start_method_falls_back_to_spawn_when_a_fork_could_not_use_cuda(monkeypatch, caplog):
    monkeypatch.delenv("PAGEDLLM_WORKER_MULTIPROC_METHOD", raising=False)
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    assert multiproc._start_method("cpu") == "spawn"  # OpenMP pools do not survive a fork
    # A process that has not touched CUDA forks its GPU ranks (this one has no GPU to touch).
    assert not multiproc._fork_breaks_cuda()
    assert multiproc._start_method("cuda") == "fork"
    monkeypatch.setattr(multiproc, "_fork_breaks_cuda", lambda: True)
    with caplog.at_level("WARNING", logger="pagedllm"):
        assert multiproc._start_method("cuda") == "spawn"
    assert "ranks are spawned" in caplog.text
    monkeypatch.setenv("PAGEDLLM_WORKER_MULTIPROC_METHOD", "forkserver")
    with pytest.raises(ValueError, match="PAGEDLLM_WORKER_MULTIPROC_METHOD='forkserver'.*'fork' or 'spawn'"):
        multiproc._start_method("cuda")
