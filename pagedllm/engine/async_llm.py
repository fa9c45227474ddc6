"""`AsyncLLM`: the asynchronous engine behind the server, with vLLM v1's interface.

    engine = AsyncLLM.from_engine_args(EngineArgs(model=...))
    async for output in engine.generate(prompt, SamplingParams(...), request_id):
        ...  # a RequestOutput, cumulative: the text and tokens so far

Tokenization (`InputProcessor`) and detokenization with stop strings (`OutputProcessor`) run
here, in the front process, on the event loop; the step loop runs in the engine-core process
(core_proc.py). One task receives every step's outputs and hands each request its latest
output; a consumer that falls behind skips intermediate outputs (they are cumulative) instead
of slowing the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Iterable
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.core_client import EngineCoreClient, EngineDeadError
from pagedllm.engine.input_processor import InputProcessor, ProcessedPrompt
from pagedllm.engine.frontend import ModelFrontend
from pagedllm.engine.output_processor import OutputProcessor, child_sampling_params
from pagedllm.engine.outputs import RequestOutput
from pagedllm.engine.request import RequestStatus
from pagedllm.engine.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.engine.stats import CompletionClock, SchedulerStats, StatLoggerBase
from pagedllm.inputs import PromptType

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError"]


class _RequestStream:
    """The latest output of one request, waiting for its consumer. DELTA outputs that arrive
    before the consumer takes the one waiting are merged into it, so no text is lost."""

    __slots__ = ("latest", "error", "aborted", "ready", "aggregate")

    def __init__(self, aggregate: bool = False) -> None:
        self.latest: RequestOutput | None = None
        self.error: BaseException | None = None
        self.aborted = False
        self.ready = asyncio.Event()
        self.aggregate = aggregate

    def put(self, output: RequestOutput) -> None:
        if self.aggregate and self.latest is not None:
            self.latest.add(output, aggregate=True)
        else:
            self.latest = output  # a whole snapshot: the newer one replaces it
        self.ready.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.ready.set()

    def abort(self) -> None:
        self.aborted = True
        self.ready.set()

    async def get(self) -> RequestOutput | None:
        """The newest output; after it, the error the stream failed with is raised, or None
        is returned when the request was aborted. An output put before the failure or abort
        comes first: the event stays set for the end, so a failure that arrives between an
        output and its consumer is not lost."""
        await self.ready.wait()
        output, self.latest = self.latest, None
        ended = self.error is not None or self.aborted
        if not ended:
            self.ready.clear()
        if output is None and self.error is not None:
            raise self.error
        return output


class AsyncLLM:
    def __init__(
        self,
        engine_config: EngineConfig,
        stat_loggers: list[StatLoggerBase] | None = None,
    ) -> None:
        start = time.perf_counter()
        self.frontend = ModelFrontend.load(engine_config.model_config)
        self.tokenizer = self.frontend.tokenizer
        self.eos_token_id = self.frontend.eos_token_id
        # Grammars are compiled here too, so an invalid one fails before the request is sent.
        self.structured_output_manager = self.frontend.structured_output_manager()
        self.output_processor = OutputProcessor(self.tokenizer)
        self.stat_loggers: list[StatLoggerBase] = list(stat_loggers or [])
        self.scheduler_stats = SchedulerStats()
        """The engine core's latest load figures."""
        self._streams: dict[str, _RequestStream] = {}
        self._clock = CompletionClock()
        """Per child request id (one per completion), for the latency metrics."""
        self._dead_error: EngineDeadError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._output_task: asyncio.Task[None] | None = None
        self.engine_core = EngineCoreClient(engine_config, self._on_engine_core_death)
        # The core's config: max_model_len="auto" is settled once the KV cache is sized.
        self.config = self.engine_core.engine_config
        self.model_config: ModelConfig = self.config.model_config
        self.input_processor = InputProcessor(self.model_config, self.tokenizer, self.structured_output_manager,
                                              "AsyncLLM's engine-core process")
        logger.info("AsyncLLM ready in %.1f s.", time.perf_counter() - start)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, stat_loggers: list[StatLoggerBase] | None = None) -> AsyncLLM:
        return cls(engine_args.create_engine_config(), stat_loggers=stat_loggers)

    @classmethod
    def from_vllm_config(cls, vllm_config: EngineConfig, stat_loggers: list[StatLoggerBase] | None = None) -> AsyncLLM:
        return cls(vllm_config, stat_loggers=stat_loggers)

    # Properties and getters vLLM's AsyncLLM has.
    @property
    def errored(self) -> bool:
        return self._dead_error is not None

    @property
    def is_running(self) -> bool:
        return self._dead_error is None

    @property
    def dead_error(self) -> BaseException:
        return self._dead_error or EngineDeadError("The engine core is running.")

    async def get_tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.tokenizer

    async def get_model_config(self) -> ModelConfig:
        return self.model_config

    async def check_health(self) -> None:
        """Raises EngineDeadError when the engine core process is gone."""
        if self._dead_error is not None:
            raise self._dead_error

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json sampling fields applied:
        what generate() uses when it is given no sampling params."""
        return self.frontend.default_sampling_params()

    def process_input(self, prompt: PromptType | ProcessedPrompt, params: SamplingParams,
                      tokenization_kwargs: dict[str, Any] | None = None) -> ProcessedPrompt:
        """Tokenizes and validates one prompt (ValueError when it cannot run), and compiles its
        structured-output grammar, as LLMEngine.process_input does."""
        if isinstance(prompt, ProcessedPrompt):
            return prompt
        return self.input_processor.process(prompt, params, tokenization_kwargs)

    async def generate(
        self,
        prompt: PromptType | ProcessedPrompt,
        sampling_params: SamplingParams | None,
        request_id: str,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yields the request's outputs until the last one (`finished=True`): cumulative, or
        as sampling_params.output_kind asks (DELTA: only what is new; FINAL_ONLY: the last).
        `sampling_params=None` uses get_default_sampling_params(). A bad prompt raises
        ValueError before anything runs; a dead engine core, EngineDeadError.
        Closing the generator (or cancelling its task, as a disconnecting client does) aborts
        the request."""
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        stream = self.add_request(request_id, prompt, sampling_params)  # raises before anything runs
        finished = False
        try:
            while not finished:
                output = await stream.get()
                if output is None:
                    return  # aborted by abort()
                finished = output.finished
                yield output
        finally:
            if not finished and self._streams.get(request_id) is stream:
                self._abort([request_id])

    def add_request(self, request_id: str, prompt: PromptType | ProcessedPrompt, params: SamplingParams) -> _RequestStream:
        if self._dead_error is not None:
            raise self._dead_error
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}.")
        processed = self.process_input(prompt, params)
        self._start_output_handler()
        child_params = [child_sampling_params(params, index) for index in range(params.n)]
        arrival_time = time.time()
        child_ids = self.output_processor.add_request(
            request_id, processed.prompt, processed.prompt_token_ids, child_params, arrival_time
        )
        stream = _RequestStream(aggregate=params.output_kind == RequestOutputKind.DELTA)
        self._streams[request_id] = stream
        self._clock.start(child_ids, len(processed.prompt_token_ids))
        requests = [self.frontend.make_request(child_id, processed, child_param, arrival_time)
                    for child_id, child_param in zip(child_ids, child_params)]
        self.engine_core.add_requests(requests)
        return stream

    async def abort(self, request_id: str | Iterable[str]) -> None:
        """Stops requests now: the engine core frees their KV blocks before its next step, and
        their generate() iterators end."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self._abort(ids)

    def _abort(self, request_ids: list[str]) -> None:
        child_ids: list[str] = []
        for request_id in request_ids:
            children = self.output_processor.abort_request(request_id)
            child_ids.extend(children)
            self._clock.forget(children)
            stream = self._streams.pop(request_id, None)
            if children:
                logger.info("Aborted request %s.", request_id)
            if stream is not None:
                stream.abort()  # its consumer gets what was put before, then nothing: the iterator ends
        if child_ids and self._dead_error is None:
            self.engine_core.abort_requests(child_ids)

    def _start_output_handler(self) -> None:
        loop = asyncio.get_running_loop()
        if self._output_task is not None and not self._output_task.done() and self._loop is loop:
            return
        self._loop = loop
        self._output_task = loop.create_task(self._handle_outputs(), name="pagedllm-output-handler")

    async def _handle_outputs(self) -> None:
        try:
            while self._dead_error is None:
                message = await self.engine_core.get_output()
                if message[0] == "error":
                    self._fail_all(EngineDeadError(f"The engine core failed: {message[1]}"))
                    return
                self._process(message[1], message[2])
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - without this task no request can finish
            logger.exception("The output handler failed.")
            self._fail_all(EngineDeadError(f"The output handler failed: {type(error).__name__}: {error}"))

    def _process(self, core_outputs: list[Any], scheduler_stats: SchedulerStats) -> None:
        self.scheduler_stats = scheduler_stats
        iteration_stats = self._clock.measure(core_outputs)
        processed = self.output_processor.process_outputs(core_outputs)
        # Finished here, not in the engine core: it must stop them, and sends no last output.
        for status, child_ids in ((RequestStatus.FINISHED_STOPPED, processed.stopped_by_string),
                                  (RequestStatus.FINISHED_ERROR, processed.failed)):
            if child_ids:
                self.engine_core.abort_requests(child_ids, status)
            self._clock.finish(child_ids, status.finish_reason or "", iteration_stats)
        for output in processed.outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            stream.put(output)
        for stat_logger in self.stat_loggers:
            stat_logger.record(scheduler_stats, iteration_stats)

    def _on_engine_core_death(self, message: str) -> None:
        """Called from the watcher thread when the engine-core process dies."""
        error = EngineDeadError(f"{message} Every pending request failed; restart the server.")
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._fail_all, error)
                return
            except RuntimeError:
                pass
        self._dead_error = self._dead_error or error

    def _fail_all(self, error: EngineDeadError, log_error: bool = True) -> None:
        if self._dead_error is None:
            self._dead_error = error
            if log_error:
                logger.error("%s", error)
        for request_id, stream in self._streams.items():
            self.output_processor.abort_request(request_id)
            stream.fail(self._dead_error)
        self._streams.clear()
        self._clock.clear()
        if self._output_task is not None and self._output_task is not asyncio.current_task():
            self._output_task.cancel()

    def shutdown(self) -> None:
        """Stops the engine-core process (and its workers); pending generate() iterators raise
        EngineDeadError. Safe to call more than once, from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed() and loop.is_running():
            try:
                on_loop = asyncio.get_running_loop() is loop
            except RuntimeError:
                on_loop = False
            error = EngineDeadError("The engine was shut down.")
            if on_loop:
                self._fail_all(error, log_error=False)
            else:
                try:
                    loop.call_soon_threadsafe(self._fail_all, error, False)
                except RuntimeError:  # the loop closed since the check: no stream is left to fail
                    pass
        self.engine_core.shutdown()
