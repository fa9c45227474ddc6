"""The executor owns the workers (one per tensor-parallel rank); the engine reaches them only
through `collective_rpc`."""

from __future__ import annotations

import abc
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
        backend = engine_config.parallel_config.distributed_executor_backend
        if backend == "uni":
            from pagedllm.executor.uniproc import UniProcExecutor

            return UniProcExecutor(engine_config)
        raise ValueError(
            f"distributed_executor_backend={backend!r} is not available yet; use 'uni'."
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

    def shutdown(self) -> None:
        """Stops the workers; safe to call more than once."""
