"""The executor owns the workers (one per tensor-parallel rank); the engine reaches them only
through `collective_rpc`."""

from __future__ import annotations

import abc
import multiprocessing
import multiprocessing.connection
import os
import socket
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, NoReturn

from pagedllm.config import EngineConfig
from pagedllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput


# Once one rank has raised, how long the others get to answer before they are presumed stuck
# in a collective that the failed rank never joined, and are stopped.
FAILURE_GRACE_S = 10.0


@dataclass(slots=True)
class RankEvent:
    """What a transport saw of one rank while the engine waited: an answer, an error raised
    in the worker (with its traceback text), or the rank's death (with how it died)."""

    rank: int
    kind: str
    """"ok", "error" or "died"."""
    value: Any = None
    """"ok": the result; "error": the exception; "died": "(pid 12) ... with signal SIGKILL"."""
    detail: str = ""
    """"error": the worker's formatted traceback; "died": a hint to add to the message."""


class Executor(abc.ABC):
    """Subclasses hold the transport (how a call reaches the ranks and how their answers come
    back); the failure policy is here, the same for every transport: a dead rank ends the wait
    at once and stops the others; after a rank raises, the rest get FAILURE_GRACE_S and are
    stopped if they do not answer; a stopped executor refuses further calls."""

    def __init__(self, engine_config: EngineConfig) -> None:
        self.engine_config = engine_config
        self.startup_seconds: dict[str, float] = {}
        """Seconds per start-up phase: init_device, load, compile, profile, kv_cache, cuda_graphs."""
        self._failure: str | None = None

    @staticmethod
    def create(engine_config: EngineConfig) -> Executor:
        """The executor `parallel_config.distributed_executor_backend` names: "uni" (this
        process), "mp" (one process per rank) or "ray" (one Ray actor per rank)."""
        backend = engine_config.parallel_config.distributed_executor_backend
        if backend == "uni":
            from pagedllm.executor.uniproc import UniProcExecutor

            return UniProcExecutor(engine_config)
        if backend == "mp":
            from pagedllm.executor.multiproc import MultiprocExecutor

            return MultiprocExecutor(engine_config)
        if backend == "ray":
            from pagedllm.executor.ray import RayExecutor

            return RayExecutor(engine_config)
        raise ValueError(
            f"distributed_executor_backend={backend!r} is not supported; use 'uni', 'mp' or 'ray'."
        )

    @abc.abstractmethod
    def collective_rpc(self, method: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        """Calls `method` on every worker and returns their results in rank order."""

    def initialize(self) -> int:
        """Starts the workers, loads the model, compiles its kernels, profiles memory,
        allocates the KV cache and captures CUDA graphs, timing each phase
        (`startup_seconds`). Returns the number of KV blocks (the minimum over ranks)."""
        self._timed("init_device", "init_device")
        self._timed("load", "load_model")
        self._timed("compile", "compile_kernels")
        num_blocks = min(self._timed("profile", "determine_num_kv_blocks"))
        self._timed("kv_cache", "initialize_kv_cache", num_blocks)
        self._timed("cuda_graphs", "compile_or_warm_up_model")
        return num_blocks

    def _timed(self, phase: str, method: str, *args: Any) -> list[Any]:
        start = time.perf_counter()
        results = self.collective_rpc(method, args)
        self.startup_seconds[phase] = time.perf_counter() - start
        return results

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collective_rpc("execute_model", (scheduler_output,))[0]

    def save_sharded_state(self, path: str, pattern: str | None = None, max_size: int | None = None) -> None:
        """Every rank writes its parameters to `path` (vLLM's name and arguments); see
        model_loader/sharded_state.py for the layout."""
        self.collective_rpc("save_sharded_state", (path, pattern, max_size))

    def shutdown(self) -> None:
        """Stops the workers; safe to call more than once."""

    # The failure policy shared by the multi-rank transports.

    def _stop_workers_now(self) -> None:
        """Stops every rank at once (after a failure); the transport's job."""

    def _is_shut_down(self) -> bool:
        return False

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"The workers were stopped after an earlier failure ({self._failure}); create a new LLM.")
        if self._is_shut_down():
            raise RuntimeError("The executor was shut down.")

    def _fail(self, reason: str) -> None:
        self._failure = reason
        self._stop_workers_now()

    def _wait_with_grace(
        self, num_ranks: int, method: str, wait: Callable[[Collection[int], float | None], list[RankEvent]]
    ) -> list[Any]:
        """Every rank's result, in rank order. `wait(pending_ranks, timeout)` blocks until at
        least one pending rank answers, raises or dies (or the timeout passes: then []). A
        death wins over errors, since the others' errors are its consequence."""
        results: list[Any] = [None] * num_ranks
        errors: dict[int, tuple[BaseException, str]] = {}
        pending = set(range(num_ranks))
        deadline: float | None = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = wait(pending, timeout)
            if not events:
                break  # the grace after an error ran out
            for event in events:
                if event.rank not in pending:
                    continue
                if event.kind == "died":
                    self._raise_died(event.rank, method, event.value, event.detail)
                pending.discard(event.rank)
                if event.kind == "ok":
                    results[event.rank] = event.value
                else:
                    errors[event.rank] = (event.value, event.detail)
                    if deadline is None:
                        deadline = time.monotonic() + FAILURE_GRACE_S
        if errors:
            self._raise_from_rank(min(errors), method, errors, sorted(pending))
        return results

    def _raise_from_rank(
        self, rank: int, method: str, errors: dict[int, tuple[BaseException, str]], stuck: list[int]
    ) -> NoReturn:
        error, remote_traceback = errors[rank]
        if stuck:
            # The ranks still running are most likely blocked in a collective the failed
            # rank never reached: they cannot be reused.
            self._fail(f"rank {rank} raised {type(error).__name__} in {method}")
            _add_note(error, f"Worker ranks {stuck} did not finish {method} within {FAILURE_GRACE_S:.0f} s and were stopped.")
        _add_note(error, f"Raised by worker rank {rank} in {method}.")
        raise error from RemoteTraceback(remote_traceback)

    def _raise_died(self, rank: int, method: str, how: str, hint: str = "") -> NoReturn:
        message = f"Worker rank {rank} {how} during {method}"
        self._fail(message)
        if method == "init_device":
            hint += (
                " If this happened while a script started, create the LLM under "
                "`if __name__ == '__main__':` (spawned workers import the "
                "main module)."
            )
        raise WorkerDiedError(
            f"{message}; the other workers were stopped. Look above for the worker's own error "
            f"(signal SIGKILL often means the out-of-memory killer).{hint}"
        )


class WorkerDiedError(RuntimeError):
    """A worker process or actor ended while the engine was waiting on it."""


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the cause of the exception it raised, so the
    engine's error shows where in the worker it failed."""

    def __init__(self, traceback_text: str) -> None:
        super().__init__(traceback_text)
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        return f"\n\n{self.traceback_text}"


def get_open_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, for the ranks' rendezvous (tcp://host:port). Another
    process could take it before the store binds it; the window is milliseconds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def describe_exit_code(exit_code: int | None) -> str:
    """"exit code 1" or "signal SIGKILL" for a process's exitcode (negative: killed by a signal)."""
    if exit_code is None:
        return "an unknown exit code"
    if exit_code < 0:
        import signal

        try:
            return f"signal {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"signal {-exit_code}"
    return f"exit code {exit_code}"


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(note)


def exit_with_parent() -> None:
    """End this process when the process that started it ends, even if that one was killed
    (SIGKILL leaves it no chance to say goodbye) and this one is blocked in a collective or a
    step, where it would never read a closed pipe."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="pagedllm-parent-watch", daemon=True).start()
