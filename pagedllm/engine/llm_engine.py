"""The engine loop: requests in, scheduler step, workers, outputs back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedllm.config import CacheConfig, EngineConfig, ModelConfig
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.core import EngineCore
from pagedllm.engine.frontend import ModelFrontend
from pagedllm.engine.input_processor import InputProcessor, ProcessedPrompt
from pagedllm.engine.metrics import EngineStats, Metric
from pagedllm.engine.output_processor import OutputProcessor, child_sampling_params
from pagedllm.engine.outputs import RequestOutput
from pagedllm.engine.request import RequestStatus
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.stats import CompletionClock
from pagedllm.executor.base import Executor
from pagedllm.inputs import PromptType

logger = logging.getLogger(__name__)

# vLLM's factory arguments that configure nothing in this engine.
_VLLM_FACTORY_OPTIONS = frozenset({"usage_context", "stat_loggers", "enable_multiprocessing"})


class LLMEngine:
    def __init__(self, engine_config: EngineConfig) -> None:
        start = time.perf_counter()
        self.frontend = ModelFrontend.load(engine_config.model_config)
        self.tokenizer = self.frontend.tokenizer
        self.eos_token_id = self.frontend.eos_token_id
        self.structured_output_manager = self.frontend.structured_output_manager()
        self.engine_core = EngineCore(engine_config, self.structured_output_manager)
        # The core's config: max_model_len="auto" is settled once the KV cache is sized.
        self.config = self.engine_core.config
        parallel = self.config.parallel_config
        sampler_process = None if parallel.distributed_executor_backend == "uni" else (
            f"a worker of distributed_executor_backend={parallel.distributed_executor_backend!r}")
        self.input_processor = InputProcessor(self.config.model_config, self.tokenizer, self.structured_output_manager,
                                              sampler_process)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stats = EngineStats(self.config.model_config.max_model_len)
        self._clock = CompletionClock()
        logger.info("Engine ready in %.1f s.", time.perf_counter() - start)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs | str | None = None, **kwargs: Any) -> LLMEngine:
        """vLLM's form, `from_engine_args(EngineArgs(model=...))` (its `usage_context`,
        `stat_loggers` and `enable_multiprocessing` are accepted and change nothing here), or
        the shorthand `from_engine_args(model, **engine options)`."""
        if isinstance(engine_args, EngineArgs):
            unknown = set(kwargs) - _VLLM_FACTORY_OPTIONS
            if unknown:
                raise TypeError(f"from_engine_args(EngineArgs) takes no engine options; got {sorted(unknown)}: "
                                "set them on the EngineArgs.")
            return cls(engine_args.create_engine_config())
        return cls(EngineArgs.from_kwargs(engine_args, **kwargs).create_engine_config())

    @classmethod
    def from_vllm_config(cls, vllm_config: EngineConfig, **_vllm_options: Any) -> LLMEngine:
        return cls(vllm_config)

    @property
    def vllm_config(self) -> EngineConfig:
        """vLLM's name for the engine's config (model, cache, parallel and scheduler configs)."""
        return self.config

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model_config

    @property
    def cache_config(self) -> CacheConfig:
        return self.config.cache_config

    def get_tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json sampling fields applied."""
        return self.frontend.default_sampling_params()

    def process_input(self, prompt: PromptType, params: SamplingParams,
                      tokenization_kwargs: dict[str, Any] | None = None) -> ProcessedPrompt:
        """Tokenizes and validates one prompt (ValueError when it cannot run), and compiles its
        structured-output grammar."""
        return self.input_processor.process(prompt, params, tokenization_kwargs)

    def add_request(self, request_id: str, prompt: PromptType | ProcessedPrompt, params: SamplingParams) -> None:
        """Queues one prompt; a bad prompt raises ValueError and leaves other requests alone."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}.")
        processed = prompt if isinstance(prompt, ProcessedPrompt) else self.process_input(prompt, params)
        child_params = [child_sampling_params(params, index) for index in range(params.n)]
        arrival_time = time.time()
        child_ids = self.output_processor.add_request(
            request_id, processed.prompt, processed.prompt_token_ids, child_params, arrival_time
        )
        self.stats.record_added(request_id, params.n, params.max_tokens)
        self._clock.start(child_ids, len(processed.prompt_token_ids))
        for child_id, child_param in zip(child_ids, child_params):
            self.engine_core.add_request(self.frontend.make_request(child_id, processed, child_param, arrival_time))

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            child_ids = self.output_processor.abort_request(request_id)
            self.stats.forget(request_id)
            self._clock.forget(child_ids)
            self.engine_core.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.engine_core.has_unfinished_requests() or self.output_processor.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        """Prompts added and not yet finished or aborted (one per add_request, whatever its n)."""
        return self.output_processor.num_unfinished()

    def collective_rpc(
        self,
        method: str | Callable[..., Any],
        timeout: float | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Runs a Worker method (by name) or a callable (worker, *args, **kwargs) on every rank;
        returns the results in rank order. Callables must pickle for the mp and ray executors.
        `timeout` is vLLM's and is not applied."""
        if callable(method):
            return self.executor.collective_rpc("run_callable", (method, *args), kwargs)
        return self.executor.collective_rpc(method, tuple(args), kwargs)

    def step(self, return_unfinished: bool = True) -> list[RequestOutput]:
        """Runs one scheduler step; returns the outputs of requests that changed (only the
        finished ones with return_unfinished=False, which saves building the others)."""
        core_outputs = self.engine_core.step()
        self.stats.record_step(self._clock.measure(core_outputs))
        processed = self.output_processor.process_outputs(core_outputs, return_unfinished)
        if processed.stopped_by_string:
            self.engine_core.finish_requests(processed.stopped_by_string, RequestStatus.FINISHED_STOPPED)
        if processed.failed:
            self.engine_core.finish_requests(processed.failed, RequestStatus.FINISHED_ERROR)
        self._clock.forget(processed.stopped_by_string + processed.failed)
        for output in processed.outputs:
            if output.finished:
                self.stats.record_finished(output)
        return processed.outputs

    def get_metrics(self) -> list[Metric]:
        return self.stats.snapshot(self.engine_core.scheduler)

    @property
    def executor(self) -> Executor:
        return self.engine_core.executor

    # vLLM's older name for the executor (its save_sharded_state example uses it).
    model_executor = executor

    @property
    def scheduler(self) -> Scheduler:
        return self.engine_core.scheduler

    def shutdown(self) -> None:
        self.engine_core.shutdown()

