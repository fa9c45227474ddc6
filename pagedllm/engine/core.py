"""`EngineCore`: the step loop over token ids. It owns the scheduler and the executor and knows
no text: requests come in tokenized, and `EngineCoreOutput`s (new token ids, finish reasons)
go out. `LLMEngine` runs it in-process; the server runs it in its own process."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pagedllm.config import EngineConfig
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.scheduler import EngineCoreOutput, Scheduler
from pagedllm.engine.stats import SchedulerStats
from pagedllm.executor.base import Executor

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, engine_config: EngineConfig) -> None:
        self.config = engine_config
        self.executor = Executor.create(engine_config)
        try:
            self.num_kv_blocks = self.executor.initialize()
        except BaseException:
            self.executor.shutdown()
            raise
        self.scheduler = Scheduler(
            engine_config.scheduler_config, engine_config.cache_config, self.num_kv_blocks
        )

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Ends requests from outside (abort, a stop string, an output error); their blocks are
        freed now and the workers drop them at the next step."""
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        """Schedules one step, runs it on the workers and returns what each request got."""
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute_model(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def shutdown(self) -> None:
        self.executor.shutdown()

    def make_stats(self) -> SchedulerStats:
        """Running and waiting requests and KV cache usage, sent with each step's outputs."""
        return self.scheduler.make_stats()
