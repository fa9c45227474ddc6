"""The engine loop: requests in, scheduler step, workers, outputs back."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedllm.config import EngineConfig
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.core import EngineCore
from pagedllm.engine.generation_config import load_generation_defaults
from pagedllm.engine.input_processor import InputProcessor, ProcessedPrompt
from pagedllm.engine.metrics import EngineStats, Metric
from pagedllm.engine.output_processor import OutputProcessor, child_request_ids, child_sampling_params
from pagedllm.engine.outputs import RequestOutput
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.tokenizer import init_tokenizer
from pagedllm.executor.base import Executor
from pagedllm.inputs import PromptType
from pagedllm.structured_output import StructuredOutputManager

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, engine_config: EngineConfig) -> None:
        start = time.perf_counter()
        model_config = engine_config.model_config
        self.tokenizer = init_tokenizer(model_config)
        self.eos_token_id = _eos_token_id(self.tokenizer, model_config.hf_config)
        self.generation_defaults = load_generation_defaults(
            model_config.generation_config,
            None if model_config.gguf_file else model_config.model_path,
            getattr(model_config.hf_config, "eos_token_id", None),
            model_config.override_generation_config,
        )
        self.eos_token_ids = self.generation_defaults.eos_token_ids - {self.eos_token_id}
        all_eos = self.eos_token_ids | ({self.eos_token_id} if self.eos_token_id is not None else set())
        self.structured_output_manager = StructuredOutputManager(self.tokenizer, model_config.vocab_size, all_eos)
        self.engine_core = EngineCore(engine_config, self.structured_output_manager)
        # The core's config: max_model_len="auto" is settled once the KV cache is sized.
        self.config = self.engine_core.config
        self.input_processor = InputProcessor(self.config.model_config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stats = EngineStats()
        logger.info("Engine ready in %.1f s.", time.perf_counter() - start)

    @classmethod
    def from_engine_args(cls, model: str | None = None, **kwargs: Any) -> LLMEngine:
        return cls(EngineArgs.from_kwargs(model, **kwargs).create_engine_config())

    def get_tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json sampling fields applied."""
        return SamplingParams(**self.generation_defaults.sampling_overrides)

    def process_input(self, prompt: PromptType, params: SamplingParams) -> ProcessedPrompt:
        """Tokenizes and validates one prompt (ValueError when it cannot run), and compiles its
        structured-output grammar."""
        processed = self.input_processor.process(prompt, params)
        self.structured_output_manager.validate(params)
        return processed

    def add_request(self, request_id: str, prompt: PromptType | ProcessedPrompt, params: SamplingParams) -> None:
        """Queues one prompt; a bad prompt raises ValueError and leaves other requests alone."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}.")
        processed = prompt if isinstance(prompt, ProcessedPrompt) else self.process_input(prompt, params)
        child_ids = child_request_ids(request_id, params.n)
        child_params = [child_sampling_params(params, index) for index in range(params.n)]
        arrival_time = time.time()
        self.output_processor.add_request(
            request_id, processed.prompt, processed.prompt_token_ids, child_ids, child_params, arrival_time
        )
        mm_inputs = processed.mm_inputs
        for child_id, child_param in zip(child_ids, child_params):
            request = Request(
                request_id=child_id,
                prompt_token_ids=list(processed.prompt_token_ids),
                sampling_params=child_param,
                eos_token_id=self.eos_token_id,
                max_tokens=processed.max_tokens,
                eos_token_ids=self.eos_token_ids,
                cache_salt=processed.cache_salt,
                arrival_time=arrival_time,
            )
            if mm_inputs is not None:
                request.mm_features = mm_inputs.features
                request.mrope_positions = mm_inputs.mrope_positions
                request.mrope_position_delta = mm_inputs.mrope_position_delta
            self.engine_core.add_request(request)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            child_ids = self.output_processor.abort_request(request_id)
            self.engine_core.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.engine_core.has_unfinished_requests() or self.output_processor.has_unfinished()

    def step(self, return_unfinished: bool = True) -> list[RequestOutput]:
        """Runs one scheduler step; returns the outputs of requests that changed (only the
        finished ones with return_unfinished=False, which saves building the others)."""
        core_outputs = self.engine_core.step()
        processed = self.output_processor.process_outputs(core_outputs, return_unfinished)
        if processed.stopped_by_string:
            self.engine_core.finish_requests(processed.stopped_by_string, RequestStatus.FINISHED_STOPPED)
        if processed.failed:
            self.engine_core.finish_requests(processed.failed, RequestStatus.FINISHED_ERROR)
        for output in processed.outputs:
            if output.finished:
                self.stats.record_finished(output)
        return processed.outputs

    def get_metrics(self) -> list[Metric]:
        return self.stats.snapshot(self.engine_core.scheduler)

    @property
    def executor(self) -> Executor:
        return self.engine_core.executor

    @property
    def scheduler(self) -> Scheduler:
        return self.engine_core.scheduler

    def shutdown(self) -> None:
        self.engine_core.shutdown()


def _eos_token_id(tokenizer: PreTrainedTokenizerBase | None, hf_config: Any) -> int | None:
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    eos = getattr(hf_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        return int(eos[0]) if eos else None
    return None if eos is None else int(eos)
