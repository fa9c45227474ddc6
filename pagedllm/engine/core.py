"""`EngineCore`: the step loop over token ids. It owns the scheduler and the executor and knows
no text: requests come in tokenized, and `EngineCoreOutput`s (new token ids, finish reasons)
go out. `LLMEngine` runs it in-process; the server runs it in its own process."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

from pagedllm.config import EngineConfig
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.scheduler import EngineCoreOutput, Scheduler
from pagedllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.engine.stats import SchedulerStats
from pagedllm.executor.base import Executor
from pagedllm.structured_output import StructuredOutputManager
from pagedllm.worker.memory_policy import largest_max_model_len

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
        if engine_config.model_config.max_model_len_auto:
            self.config = engine_config = _with_auto_max_model_len(engine_config, self.num_kv_blocks)
        self.config = engine_config = dataclasses.replace(
            engine_config, cache_config=dataclasses.replace(engine_config.cache_config, num_gpu_blocks=self.num_kv_blocks)
        )
        self.scheduler = Scheduler(
            engine_config.scheduler_config, engine_config.cache_config, self.num_kv_blocks
        )
        self.async_scheduling = engine_config.scheduler_config.async_scheduling
        self._in_flight: SchedulerOutput | None = None
        """With async scheduling: the step the workers ran last, whose output the next
        execute_model returns."""

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
        # A step in flight is drained even when every request has ended, so its (discarded)
        # output is never mistaken for that of a later request with the same id.
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def step(self) -> list[EngineCoreOutput]:
        """Schedules one step and runs it on the workers. Returns what each request got from
        this step, or with async scheduling from the step before: the workers queue step N+1
        before handing back step N's tokens, so this method's caller (output processing,
        detokenization, stop strings) runs while the device computes."""
        structured = self.structured_output_manager
        if self._in_flight is not None and structured is not None and structured.has_requests():
            # A grammar's bitmask for the next step needs the tokens of the step in flight:
            # finish that step first (grammar-constrained requests run one step at a time).
            return self._finish(self._in_flight, self.executor.execute_model(_empty_step()))
        scheduler_output = self.scheduler.schedule()
        if structured is not None:
            structured.grammar_bitmask(scheduler_output)
        runner_output = self.executor.execute_model(scheduler_output)
        if not self.async_scheduling:
            return self._finish(scheduler_output, runner_output)
        finished_step = self._in_flight
        self._in_flight = None if scheduler_output.is_empty else scheduler_output
        if finished_step is None:
            return []
        return self._finish(finished_step, runner_output)

    def _finish(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        if scheduler_output is self._in_flight:
            self._in_flight = None
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        if self.structured_output_manager is not None:
            self.structured_output_manager.accept_tokens(outputs)
        return outputs

    def save_sharded_state(self, path: str, pattern: str | None = None, max_size: int | None = None) -> None:
        """vLLM's `llm.llm_engine.engine_core.save_sharded_state(path=..., pattern=..., max_size=...)`:
        each rank writes its parameters to `path` (the config and tokenizer files are the
        caller's to copy, as in vLLM's example; `pagedllm save-sharded` copies them)."""
        self.executor.save_sharded_state(path, pattern, max_size)

    def shutdown(self) -> None:
        self.executor.shutdown()

    def make_stats(self) -> SchedulerStats:
        """Running and waiting requests and KV cache usage, sent with each step's outputs."""
        return self.scheduler.make_stats()

def _with_auto_max_model_len(engine_config: EngineConfig, num_kv_blocks: int) -> EngineConfig:
    """max_model_len="auto": the model's length, or less when one request of it would not fit
    the KV cache. The configs stay frozen; the engine continues with the derived one."""
    model_config, scheduler_config = engine_config.model_config, engine_config.scheduler_config
    block_size = engine_config.cache_config.block_size
    chosen = largest_max_model_len(num_kv_blocks, block_size, model_config.max_model_len)
    logger.info(
        "max_model_len='auto': %d (%s), since the KV cache holds %d tokens (%d blocks of %d).",
        chosen, "the model's length" if chosen == model_config.max_model_len
        else f"below the model's {model_config.max_model_len}", num_kv_blocks * block_size,
        num_kv_blocks, block_size,
    )
    return dataclasses.replace(
        engine_config,
        model_config=dataclasses.replace(model_config, max_model_len=chosen),
        scheduler_config=dataclasses.replace(scheduler_config, max_model_len=chosen),
    )


def _empty_step() -> SchedulerOutput:
    """A step that schedules nothing: with async scheduling it returns the step in flight."""
    return SchedulerOutput(
        scheduled_new_reqs=[], scheduled_cached_reqs=[], num_scheduled_tokens={}, total_num_scheduled_tokens=0
    )
