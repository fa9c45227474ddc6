"""What `LLM.generate` returns, with vLLM's class and field names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Logprob:
    """The log-probability of one token, its rank in the vocabulary (1 = most likely) and its
    decoded text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the chosen token plus the top-k ones).
SampleLogprobs = list[dict[int, Logprob]]
# The first prompt token has no logprob, so its entry is None.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One completion of a prompt."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    """"stop" (EOS, a stop token or a stop string), "length" (max_tokens or max_model_len),
    "abort", "error" (this request failed; the others went on), or None while running."""
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended the completion; None for EOS or length."""
    lora_request: None = None
    """Always None: LoRA adapters are not supported."""

    def finished(self) -> bool:
        return self.finish_reason is not None

    def extend(self, delta: CompletionOutput) -> None:
        """Appends a later DELTA output of this completion (RequestOutput.add)."""
        self.text += delta.text
        self.token_ids = [*self.token_ids, *delta.token_ids]
        if delta.logprobs:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.cumulative_logprob = delta.cumulative_logprob
        self.finish_reason = delta.finish_reason
        self.stop_reason = delta.stop_reason


@dataclass
class RequestMetrics:
    """When things happened to one request, in wall-clock seconds (time.time()), with vLLM's
    names (RequestMetrics of v0 and RequestStateStats of v1)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generation_tokens: int = 0

    @property
    def queued_ts(self) -> float:
        return self.arrival_time

    @property
    def scheduled_ts(self) -> float | None:
        return self.first_scheduled_time

    @property
    def first_token_ts(self) -> float | None:
        return self.first_token_time

    @property
    def last_token_ts(self) -> float | None:
        return self.last_token_time

    @property
    def is_corrupted(self) -> bool:
        """vLLM v1 flags outputs with NaN logits; pagedllm never marks one."""
        return False

    @property
    def time_in_queue(self) -> float | None:
        """Seconds from arrival to the first step that ran the request."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def prefill_time(self) -> float | None:
        """Seconds from the first scheduled step to the first output token."""
        if self.first_token_time is None or self.first_scheduled_time is None:
            return None
        return self.first_token_time - self.first_scheduled_time

    @property
    def first_token_latency(self) -> float | None:
        """Seconds from arrival to the first output token (time to first token)."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def decode_time(self) -> float | None:
        if self.first_token_time is None or self.last_token_time is None:
            return None
        return self.last_token_time - self.first_token_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    """The result of one prompt: its tokens and its completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = field(default=None)
    """Why the request failed, when a completion's finish_reason is "error"."""
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None
    """Prompt tokens served from the prefix cache."""
    lora_request: None = None
    """Always None: LoRA adapters are not supported."""
    encoder_prompt: str | None = None
    """Always None: encoder-decoder models are not supported."""
    encoder_prompt_token_ids: list[int] | None = None
    multi_modal_placeholders: dict[str, Any] = field(default_factory=dict)
    kv_transfer_params: dict[str, Any] | None = None
    """Always None: disaggregated prefill is not supported."""

    def add(self, next_output: RequestOutput, aggregate: bool) -> None:
        """Folds a later output of the same request into this one, as vLLM's does when a
        consumer falls behind: with `aggregate` (DELTA outputs) each completion's new text,
        tokens and logprobs are appended to its own; otherwise a completion is replaced by its
        newer version. A completion this output lacks is added."""
        self.finished = self.finished or next_output.finished
        self.error = next_output.error or self.error
        self.metrics = next_output.metrics or self.metrics
        if self.num_cached_tokens is None:
            self.num_cached_tokens = next_output.num_cached_tokens
        if aggregate and next_output.prompt_logprobs:
            self.prompt_logprobs = (self.prompt_logprobs or []) + next_output.prompt_logprobs
        by_index = {completion.index: position for position, completion in enumerate(self.outputs)}
        for completion in next_output.outputs:
            position = by_index.get(completion.index)
            if position is None:
                by_index[completion.index] = len(self.outputs)
                self.outputs.append(completion)
            elif aggregate:
                self.outputs[position].extend(completion)
            else:
                self.outputs[position] = completion
