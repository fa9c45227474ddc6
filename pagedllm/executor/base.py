"""The executor owns the workers (one per tensor-parallel rank); the engine reaches them only
through `collective_rpc`."""

from __future__ import annotations

import abc
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput


class Executor(abc.ABC):
    def __init__(self, engine_config: EngineConfig) -> None:
        self.engine_config = engine_config

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
        """Starts the workers, loads the model, profiles memory and allocates the KV cache.
        Returns the number of KV blocks (the minimum over ranks)."""
        self.collective_rpc("init_device")
        self.collective_rpc("load_model")
        num_blocks = min(self.collective_rpc("determine_num_kv_blocks"))
        self.collective_rpc("initialize_kv_cache", (num_blocks,))
        self.collective_rpc("compile_or_warm_up_model")
        return num_blocks

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collective_rpc("execute_model", (scheduler_output,))[0]

    def shutdown(self) -> None:
        """Stops the workers; safe to call more than once."""
