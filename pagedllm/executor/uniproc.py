"""One worker in the engine's own process (tensor_parallel_size=1)."""

from __future__ import annotations

from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.executor.base import Executor
from pagedllm.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, engine_config: EngineConfig) -> None:
        super().__init__(engine_config)
        self.worker: Worker | None = Worker(engine_config, rank=0, local_rank=0)

    def collective_rpc(self, method: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        if self.worker is None:
            raise RuntimeError("The executor was shut down.")
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
