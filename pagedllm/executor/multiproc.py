"""One process per tensor-parallel rank, each holding a Worker; the engine's process
holds no model and talks to the ranks over one pipe each.

GPU ranks are forked, as vLLM's are: a forked rank shares the modules the engine's process
already imported, where a spawned one spends several seconds importing torch and pagedllm
again (about 10 s of a 23 s two-GPU start-up on an H200). A process whose CUDA state a fork
would break ("Cannot re-initialize CUDA in forked subprocess": it used CUDA, or asked the
CUDA runtime for its devices) gets spawned ranks instead. A forked rank runs torch on one CPU
thread, because an OpenMP thread pool does not survive a fork: more threads would hang in
the first parallel region. GPU ranks do their work on the GPU; CPU ranks compute on the
CPU, so they are spawned unless PAGEDLLM_WORKER_MULTIPROC_METHOD=fork asks otherwise. Spawned ranks
import the user's main module: a script must create its LLM under
`if __name__ == "__main__":`.

An RPC is `(call_id, method, args, kwargs, reply_rank)`, pickled once and written once into a
shared-memory ring that every rank reads (shm_broadcast.py; a payload too large for a slot goes
over each rank's pipe instead); each rank answers over its pipe `(call_id, "ok", result)` or
`(call_id, "error", exception, traceback text)`. While waiting, the engine
also watches every process's sentinel, so a rank that dies (killed, out of memory, a crash in
native code) becomes a `WorkerDiedError` at once instead of a hang, and the other ranks, which
may be blocked in a collective waiting for it, are stopped.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from collections.abc import Collection
from typing import Any

import torch

from pagedllm import envs
from pagedllm.config import EngineConfig
from pagedllm.distributed.parallel_state import host_store
from pagedllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.executor.base import Executor, RankEvent, describe_exit_code, exit_with_parent, get_open_port
from pagedllm.executor.shm_broadcast import GPU_SPIN_S, ShmBroadcast

logger = logging.getLogger(__name__)

_SHUTDOWN = "__shutdown__"
# How long a rank gets to leave on its own at shutdown before it is terminated.
_SHUTDOWN_TIMEOUT_S = 5.0


@dataclass
class _WorkerProcess:
    rank: int
    process: BaseProcess
    conn: Connection


class MultiprocExecutor(Executor):
    def __init__(self, engine_config: EngineConfig) -> None:
        super().__init__(engine_config)
        world_size = engine_config.parallel_config.tensor_parallel_size
        start_method = _start_method(engine_config.device_config.device.type)
        context = multiprocessing.get_context(start_method)
        port = get_open_port()
        init_method = f"tcp://127.0.0.1:{port}"
        self._workers: list[_WorkerProcess] = []
        # Numbers each call, so answers to a call the engine stopped waiting for (Ctrl-C)
        # are recognised and dropped instead of being taken for the next call's.
        self._call_id = 0
        # The finalizer holds the list, not the executor, so dropping the executor (or the
        # interpreter exiting) still stops the processes.
        self._broadcast = ShmBroadcast(world_size)
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers, True, self._broadcast)
        start = time.perf_counter()
        for rank in range(world_size):
            parent_conn, child_conn = context.Pipe(duplex=True)
            process = context.Process(
                target=_worker_main,
                args=(engine_config, rank, rank, init_method, child_conn, self._broadcast.handle(), time.time(),
                      start_method == "fork"),
                name=f"pagedllm-worker-rank-{rank}",
                daemon=True,
            )
            try:
                process.start()
            except BaseException:
                self._finalizer()
                raise
            finally:
                child_conn.close()
            self._workers.append(_WorkerProcess(rank, process, parent_conn))
        # Served from here, not by rank 0, and up before any rank's init_device asks for it
        # (see host_store). Created after the forks, which then copy no server thread.
        try:
            self._rendezvous_store = host_store(port, world_size)
        except BaseException:
            self._finalizer()
            raise
        logger.info(
            "Started %d worker processes (%s, pids %s) in %.1f s; ranks meet at %s.",
            world_size, start_method, ", ".join(str(w.process.pid) for w in self._workers),
            time.perf_counter() - start, init_method,
        )

    @property
    def worker_pids(self) -> list[int]:
        """The process id of each rank, in rank order."""
        return [int(w.process.pid or 0) for w in self._workers]

    def collective_rpc(self, method: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        return self._call(method, args, kwargs or {}, reply_rank=None)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        # Every rank computes the same output; only rank 0's crosses the pipe back.
        return self._call("execute_model", (scheduler_output,), {}, reply_rank=0)[0]

    def shutdown(self) -> None:
        self._finalizer()

    def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], reply_rank: int | None) -> list[Any]:
        self._check_usable()
        self._call_id += 1
        payload = pickle.dumps((self._call_id, method, args, kwargs, reply_rank), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            sent = self._broadcast.write(payload, lambda: all(w.process.is_alive() for w in self._workers))
        except RuntimeError:
            sent = False  # a rank died; the wait below reports which
        for worker in self._workers if not sent else ():
            try:
                worker.conn.send_bytes(payload)
            except OSError:  # the pipe broke: the process is gone
                self._raise_died(worker.rank, method, self._how_it_died(worker))
        return self._wait_with_grace(len(self._workers), method, self._wait)

    def _wait(self, pending: Collection[int], timeout: float | None) -> list[RankEvent]:
        """Answers and deaths among the pending ranks; [] once `timeout` has passed."""
        workers = [self._workers[rank] for rank in pending]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            waitables: list[Any] = [w.conn for w in workers] + [w.process.sentinel for w in workers]
            ready = multiprocessing.connection.wait(waitables, remaining)
            if not ready:
                return []
            events = []
            for worker in workers:
                # A rank may have answered and then exited: read its answer first.
                if worker.conn in ready or worker.conn.poll():
                    try:
                        call_id, status, *value = pickle.loads(worker.conn.recv_bytes())
                    except (EOFError, OSError):
                        events.append(RankEvent(worker.rank, "died", self._how_it_died(worker)))
                        continue
                    if call_id != self._call_id:
                        continue  # an answer to an interrupted earlier call
                    events.append(RankEvent(worker.rank, "ok" if status == "ok" else "error", *value))
                elif worker.process.sentinel in ready:
                    events.append(RankEvent(worker.rank, "died", self._how_it_died(worker)))
            if events:
                return events

    @staticmethod
    def _how_it_died(worker: _WorkerProcess) -> str:
        worker.process.join(timeout=1.0)
        return f"(pid {worker.process.pid}) died with {describe_exit_code(worker.process.exitcode)}"

    def _is_shut_down(self) -> bool:
        return not self._finalizer.alive

    def _stop_workers_now(self) -> None:
        _stop_workers(self._workers, False, self._broadcast)
        self._finalizer.detach()


def _start_method(device_type: str) -> str:
    requested = envs.worker_multiproc_method() or ("fork" if device_type == "cuda" else "spawn")
    if requested == "fork" and _fork_breaks_cuda():
        logger.warning(
            "This process already initialized CUDA (or asked the CUDA runtime for its devices), "
            "which a forked rank cannot undo, so the ranks are spawned: each imports torch and "
            "pagedllm again, several seconds of start-up. Create the LLM before touching CUDA "
            "(torch.cuda.device_count() is safe; torch.cuda.is_available() is not) to fork them."
        )
        return "spawn"
    return requested


def _fork_breaks_cuda() -> bool:
    """Whether a forked child of this process would refuse CUDA. torch marks a child "in bad
    fork" when the parent initialized CUDA or counted devices through the CUDA runtime; only a
    child can see the mark, so a throwaway one is forked to look."""
    if torch.cuda.is_initialized():
        return True
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only reports and leaves
        os._exit(1 if torch.cuda._is_in_bad_fork() else 0)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status) != 0


def _stop_workers(workers: list[_WorkerProcess], graceful: bool, broadcast: ShmBroadcast) -> None:
    """Ask each rank to leave, then terminate and finally kill those that did not; every
    process is joined, so none is left behind. Safe to call more than once."""
    if graceful:
        message = pickle.dumps((0, _SHUTDOWN, (), {}, None))
        for worker in workers:
            if worker.process.is_alive():
                try:
                    worker.conn.send_bytes(message)
                except OSError:
                    pass
        deadline = time.monotonic() + _SHUTDOWN_TIMEOUT_S
        for worker in workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
    for stop in ("terminate", "kill"):
        alive = [worker for worker in workers if worker.process.is_alive()]
        for worker in alive:
            getattr(worker.process, stop)()
        for worker in alive:
            worker.process.join(timeout=2.0)
    for worker in workers:
        worker.conn.close()
    broadcast.close(unlink=True)


def _worker_main(
    engine_config: EngineConfig, rank: int, local_rank: int, init_method: str, conn: Connection,
    broadcast_handle: tuple[str, int, int, int], spawned_at: float, forked: bool,
) -> None:
    """The body of each worker process: answer RPCs until told to stop or the engine is gone."""
    # Ctrl-C reaches the whole process group; the engine decides what happens and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent()
    from pagedllm.worker.worker import Worker

    worker = Worker(engine_config, rank, local_rank, distributed_init_method=init_method, forked=forked, hosted_store=True)
    logger.info("Rank %d: process started and imported in %.2f s.", rank, time.time() - spawned_at)
    spin_s = GPU_SPIN_S if engine_config.device_config.device.type == "cuda" else 0.0
    broadcast = ShmBroadcast.attach(broadcast_handle, rank, spin_s)
    try:
        while True:
            try:
                message = _next_message(broadcast, conn)
            except (EOFError, OSError):
                break  # the engine's end closed
            call_id, method, args, kwargs, reply_rank = pickle.loads(message)
            if method == _SHUTDOWN:
                break
            try:
                result = getattr(worker, method)(*args, **kwargs)
                answer = pickle.dumps(
                    (call_id, "ok", result if reply_rank in (None, rank) else None),
                    protocol=pickle.HIGHEST_PROTOCOL,
                )
            except Exception as error:
                answer = pickle.dumps((call_id, "error", _picklable(error), traceback.format_exc()))
            conn.send_bytes(answer)
    finally:
        worker.shutdown()
        conn.close()
        broadcast.close()


def _next_message(broadcast: ShmBroadcast, conn: Connection) -> bytes:
    """The next call, from the shared-memory ring, or from the pipe when the ring says so or
    when the pipe carries a message the ring does not announce (shutdown)."""
    sleep_s = 0.0
    while True:
        message = broadcast.poll()
        if message is None and conn.poll():
            # The writer publishes a pipe marker before sending on the pipe: look again.
            message = broadcast.poll()
            if message is None:
                return conn.recv_bytes()
        if message is True:
            return conn.recv_bytes()
        if isinstance(message, bytes):
            return message
        sleep_s = broadcast.wait_sleep(sleep_s)


def _picklable(error: BaseException) -> BaseException:
    """`error` if it survives pickling (most do), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
