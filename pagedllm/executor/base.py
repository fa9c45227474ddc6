"""The executor owns the workers (one per tensor-parallel rank); the engine reaches them only
through `collective_rpc`."""

from __future__ import annotations

import abc
import socket
import time
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput


class Executor(abc.ABC):
    def __init__(self, engine_config: EngineConfig) -> None:
        self.engine_config = engine_config
        self.startup_seconds: dict[str, float] = {}
        """Seconds per start-up phase: init_device, load, profile, kv_cache, cuda_graphs."""

    @staticmethod
    def create(engine_config: EngineConfig) -> Executor:
        """The executor `parallel_config.distributed_executor_backend` names: "uni" (this
        process), "mp" (one spawned process per rank) or "ray" (one Ray actor per rank)."""
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
        """Starts the workers, loads the model, profiles memory, allocates the KV cache and
        captures CUDA graphs, timing each phase (`startup_seconds`). Returns the number of KV
        blocks (the minimum over ranks)."""
        self._timed("init_device", "init_device")
        self._timed("load", "load_model")
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
    process could take it before rank 0 binds it; the window is milliseconds."""
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
