"""Turns the scheduler's token-level outputs into `RequestOutput`s: detokenizes, applies stop
strings, gathers logprobs, and joins the n completions of one prompt."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from pagedllm.engine.detokenizer import IncrementalDetokenizer, decode_logprobs
from pagedllm.engine.outputs import CompletionOutput, PromptLogprobs, RequestMetrics, RequestOutput, SampleLogprobs
from pagedllm.engine.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.engine.scheduler import EngineCoreOutput

logger = logging.getLogger(__name__)


@dataclass
class _CompletionState:
    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0
    """Tokens (and logprob rows) already returned, for DELTA outputs."""

    def to_output(self, delta: bool) -> CompletionOutput:
        """All of the completion so far, or (delta) what was not returned before. While it
        runs, text that could be the start of a stop string is held back, as in vLLM."""
        # A failed completion's detokenizer may be what failed: its held text is not flushed.
        finished = self.finish_reason not in (None, "error")
        text = self.detokenizer.get_next_output_text(finished, delta) if self.detokenizer else ""
        start = self.num_sent_tokens if delta else 0
        self.num_sent_tokens = len(self.token_ids)
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=self.token_ids[start:],
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs[start:] if delta and self.logprobs is not None else self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class _PromptState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    completions: dict[str, _CompletionState]
    """Keyed by the child request id the scheduler knows."""
    prompt_logprobs: PromptLogprobs | None
    error: str | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))
    num_cached_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    num_sent_prompt_logprobs: int = 0

    def record(self, output: EngineCoreOutput) -> None:
        """Timestamps and prefix-cache hits from one step's output."""
        now = time.time()
        metrics = self.metrics
        if metrics.first_scheduled_time is None and output.first_scheduled_time is not None:
            metrics.first_scheduled_time = output.first_scheduled_time
        if output.num_cached_tokens >= 0 and self.num_cached_tokens is None:
            self.num_cached_tokens = output.num_cached_tokens
        if output.new_token_ids:
            metrics.num_generation_tokens += len(output.new_token_ids)
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions.values())

    def to_output(self, updated_children: set[str]) -> RequestOutput:
        """CUMULATIVE and FINAL_ONLY: every completion, whole. DELTA (vLLM's streaming kind):
        the completions this step updated, each with what is new since the last output, and
        the prompt logprobs not returned before."""
        delta = self.output_kind == RequestOutputKind.DELTA
        children = [child for child in self.completions if not delta or child in updated_children]
        prompt_logprobs = self.prompt_logprobs
        if delta and prompt_logprobs is not None:
            prompt_logprobs = prompt_logprobs[self.num_sent_prompt_logprobs :]
            self.num_sent_prompt_logprobs += len(prompt_logprobs)
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=[self.completions[child].to_output(delta)
                     for child in sorted(children, key=lambda child: self.completions[child].index)],
            finished=self.finished,
            error=self.error,
            metrics=self.metrics,
            num_cached_tokens=self.num_cached_tokens,
        )


def child_sampling_params(params: SamplingParams, index: int) -> SamplingParams:
    """Each completion samples on its own; a seeded prompt gives completion i the seed + i so
    the n completions differ yet stay reproducible."""
    child = params.clone()
    child.n = 1
    if params.seed is not None:
        child.seed = params.seed + index
    return child


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)
    stopped_by_string: list[str] = field(default_factory=list)
    """Child ids a stop string finished: the scheduler must stop them."""
    failed: list[str] = field(default_factory=list)
    """Child ids whose output could not be processed: the scheduler must drop them."""


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.tokenizer = tokenizer
        self._prompts: dict[str, _PromptState] = {}
        self._parent_of: dict[str, str] = {}
        self._num_admitted = 0

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        child_params: list[SamplingParams],
        arrival_time: float | None = None,
    ) -> list[str]:
        """Starts tracking one prompt; returns the scheduler-level ids of its completions.

        They are unique to this admission (vLLM's "{index}_{id}" plus "-{admission}"), like
        vLLM's internal request ids: a request id reused right after an abort must not receive
        the tokens the engine had already computed, or had in flight, for the aborted one."""
        if request_id in self._prompts:
            raise ValueError(f"Request id {request_id!r} is already running; give each request its own id.")
        admission = self._num_admitted
        self._num_admitted += 1
        n = len(child_params)
        child_ids = [f"{request_id}-{admission}" if n == 1 else f"{index}_{request_id}-{admission}"
                     for index in range(n)]
        completions = {}
        for index, (child_id, params) in enumerate(zip(child_ids, child_params, strict=True)):
            detokenizer = None
            if self.tokenizer is not None and params.detokenize:
                detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
            completions[child_id] = _CompletionState(
                index=index,
                params=params,
                detokenizer=detokenizer,
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
            self._parent_of[child_id] = request_id
        wants_prompt_logprobs = child_params[0].prompt_logprobs is not None
        self._prompts[request_id] = _PromptState(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            completions=completions,
            # The first prompt token has no logprob: nothing comes before it.
            prompt_logprobs=[None] if wants_prompt_logprobs else None,
            metrics=RequestMetrics(arrival_time=time.time() if arrival_time is None else arrival_time),
            output_kind=child_params[0].output_kind,
        )
        return child_ids

    def has_unfinished(self) -> bool:
        return bool(self._prompts)

    def num_unfinished(self) -> int:
        return len(self._prompts)

    def process_outputs(self, outputs: list[EngineCoreOutput], return_unfinished: bool = True) -> ProcessedOutputs:
        """Detokenizes and gathers one step's outputs. A request whose output cannot be
        processed fails alone (finish_reason "error"); the others go on."""
        updated: dict[str, set[str]] = {}
        result = ProcessedOutputs()
        for output in outputs:
            parent_id = self._parent_of.get(output.request_id)
            if parent_id is None:
                continue
            state = self._prompts[parent_id]
            completion = state.completions[output.request_id]
            state.record(output)
            try:
                if output.new_prompt_logprobs is not None and state.prompt_logprobs is not None and completion.index == 0:
                    state.prompt_logprobs.extend(decode_logprobs(self._logprob_tokenizer(completion),
                                                                 output.new_prompt_logprobs))
                if self._append_tokens(completion, output):
                    result.stopped_by_string.append(output.request_id)
            except Exception as error:
                logger.exception("Request %s failed while processing its output.", output.request_id)
                self._fail(state, repr(error))
                result.failed.extend(c for c, s in state.completions.items() if s.finish_reason == "error")
                updated.setdefault(parent_id, set()).update(state.completions)
            updated.setdefault(parent_id, set()).add(output.request_id)
        for parent_id, children in updated.items():
            state = self._prompts[parent_id]
            if state.finished:
                state.metrics.finished_time = time.time()
                result.outputs.append(state.to_output(children))
                self._forget(parent_id)
            elif return_unfinished and state.output_kind != RequestOutputKind.FINAL_ONLY:
                result.outputs.append(state.to_output(children))
        return result

    @staticmethod
    def _fail(state: _PromptState, reason: str) -> None:
        state.error = reason
        for completion in state.completions.values():
            if completion.finish_reason is None:
                completion.finish_reason = "error"

    def _append_tokens(self, completion: _CompletionState, output: EngineCoreOutput) -> bool:
        if completion.finish_reason is not None:
            return False
        completion.token_ids.extend(output.new_token_ids)
        if output.new_logprobs is not None and completion.logprobs is not None:
            completion.logprobs.extend(decode_logprobs(self._logprob_tokenizer(completion), output.new_logprobs))
            completion.cumulative_logprob = (completion.cumulative_logprob or 0.0) + sum(
                row[0] for row in output.new_logprobs.logprobs
            )
        stop_string = None
        if completion.detokenizer is not None:
            # EOS or a stop token id ended the request: as in vLLM, its text is left out.
            stop_terminated = output.finish_reason == "stop" and not isinstance(output.stop_reason, str)
            stop_string = completion.detokenizer.update(output.new_token_ids, stop_terminated)
            if output.finish_reason is not None or stop_string is not None:
                stop_string = completion.detokenizer.flush() or stop_string
        if stop_string is not None:
            completion.finish_reason = "stop"
            completion.stop_reason = stop_string
            return output.finish_reason is None
        if output.finish_reason is not None:
            completion.finish_reason = output.finish_reason
            completion.stop_reason = output.stop_reason
        return False

    def _logprob_tokenizer(self, completion: _CompletionState) -> PreTrainedTokenizerBase | None:
        """As in vLLM, detokenize=False leaves every Logprob.decoded_token None."""
        return self.tokenizer if completion.params.detokenize else None

    def abort_request(self, request_id: str) -> list[str]:
        """Forgets a prompt; returns its child ids for the scheduler."""
        state = self._prompts.pop(request_id, None)
        if state is None:
            return []
        for child_id in state.completions:
            self._parent_of.pop(child_id, None)
        return list(state.completions)

    def _forget(self, parent_id: str) -> None:
        state = self._prompts.pop(parent_id)
        for child_id in state.completions:
            self._parent_of.pop(child_id, None)
