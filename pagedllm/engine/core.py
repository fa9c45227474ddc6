"""`EngineCore`: the step loop over token ids. It owns the scheduler and the executor and knows
no text: requests come in tokenized, and `EngineCoreOutput`s (new token ids, finish reasons)
go out. `LLMEngine` runs it in-process; the server runs it in its own process."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pagedllm.config import EngineConfig
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.scheduler import EngineCoreOutput, Scheduler
from pagedllm.executor.base import Executor
from pagedllm.structured_output import StructuredOutputManager

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(
        self, engine_config: EngineConfig, structured_output_manager: StructuredOutputManager | None = None
    ) -> None:
        self.config = engine_config
        self.structured_output_manager = structured_output_manager
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
        if self.structured_output_manager is not None:
            self.structured_output_manager.add_request(request.request_id, request.sampling_params)
        self.scheduler.add_request(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Ends requests from outside (abort, a stop string, an output error); their blocks are
        freed now and the workers drop them at the next step."""
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        request_ids = list(request_ids)
        self.scheduler.finish_requests(request_ids, status)
        if self.structured_output_manager is not None:
            self.structured_output_manager.remove_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        """Schedules one step, runs it on the workers and returns what each request got."""
        scheduler_output = self.scheduler.schedule()
        structured = self.structured_output_manager
        if structured is not None:
            structured.grammar_bitmask(scheduler_output)
        runner_output = self.executor.execute_model(scheduler_output)
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        if structured is not None:
            structured.accept_tokens(outputs)
        return outputs

    def shutdown(self) -> None:
        self.executor.shutdown()
