"""A request as the scheduler sees it: token ids and counters, no text and no tensors."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    """One sequence to generate. `n > 1` prompts are split into one Request per completion."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    max_tokens: int
    """The resolved output budget: sampling_params.max_tokens capped by max_model_len."""
    eos_token_ids: frozenset[int] = frozenset()
    """Further EOS ids (generation_config.json lists several for some models): they stop the
    request like eos_token_id does."""
    cache_salt: str | None = None
    """Separates this request's prefix-cache namespace (the salt is hashed into its first block)."""
    arrival_time: float = field(default_factory=time.time)
    first_scheduled_time: float | None = None
    """Wall-clock time of the first step that ran this request."""
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose KV is in the cache (prefix-cache hits included)."""
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_cached_tokens: int = -1
    """Prompt tokens served from the prefix cache at first scheduling (-1: not yet scheduled)."""
    num_preemptions: int = 0
    num_prompt_logprob_rows: int = 0
    """Prompt positions whose logprobs have been sent: a recompute after a preemption scores
    them again, and those rows are dropped."""
    num_output_placeholders: int = 0
    """With async scheduling: tokens sampled by steps in flight whose ids the host does not
    know yet. They count as computed-to-be inputs for the next step's scheduling."""
    mm_features: list[Any] = field(default_factory=list)
    """multimodal.inputs.MultiModalFeature per item of the prompt, in prompt order. The
    scheduler reads only their placeholder ranges and identifiers (for block hashes)."""
    mrope_positions: Any = None
    """[3, num_prompt_tokens] M-RoPE positions (numpy) for the Qwen2-VL family, else None."""
    mrope_position_delta: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_output_placeholders

    @property
    def use_prefix_cache(self) -> bool:
        # Prompt logprobs need the logits of every prompt position, so cached prefixes
        # cannot be skipped for such requests (vLLM does the same).
        params = self.sampling_params
        return params.prompt_logprobs is None and not params.skip_reading_prefix_cache

    def token_id_at(self, index: int) -> int:
        num_prompt = len(self.prompt_token_ids)
        if index < num_prompt:
            return self.prompt_token_ids[index]
        return self.output_token_ids[index - num_prompt]
