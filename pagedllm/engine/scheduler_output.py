"""The messages between the engine and the workers for one step.

`SchedulerOutput` carries only what changed since the last step: new (or resumed) requests in
full, running ones as ids plus new block ids. Workers keep their own copy of each request's
tokens and block table, and append the tokens they sample, so the bytes sent per step do not
grow with context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request the workers have not seen, or one resumed after preemption (its earlier
    state was dropped, so it comes again with every token it has)."""

    req_id: str
    token_ids: list[int]
    """Prompt plus the output tokens generated so far."""
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_id: int | None
    """The engine's EOS id (from the tokenizer), which min_tokens keeps from being sampled."""
    eos_token_ids: frozenset[int] = frozenset()
    """Further EOS ids from generation_config.json (min_tokens bans them too)."""
    mm_features: list[Any] = field(default_factory=list)
    """The prompt's multi-modal items (MultiModalFeature: tensors, placeholder, hash)."""
    mrope_positions: Any = None
    """[3, num_prompt_tokens] M-RoPE positions, or None."""
    mrope_position_delta: int = 0
    """Positions after the prompt are p + delta (M-RoPE)."""


@dataclass(slots=True)
class CachedRequestData:
    """A request the workers already hold: only its newly allocated blocks."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass(slots=True)
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    """Tokens to compute this step, per request id. Order of iteration = batch order."""
    total_num_scheduled_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)
    """Requests finished, aborted or preempted since the last step: workers drop their state."""
    grammar_bitmask: Any = None
    """numpy int32 [len(structured_output_request_ids), words]: the structured-output token
    masks of this step (bit j of word i allows token 32 i + j); None when no request has one."""
    structured_output_request_ids: dict[str, int] = field(default_factory=dict)
    """Request id -> its row of grammar_bitmask."""

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probabilities of some positions: for each position, the chosen token first, then the
    top-k tokens. Plain lists so the message crosses processes cheaply."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]
    """Rank of the chosen token at each position (1 = most likely)."""

    def rows_from(self, first: int) -> TokenLogprobs:
        """The positions from `first` on."""
        return TokenLogprobs(self.token_ids[first:], self.logprobs[first:], self.ranks[first:])


@dataclass(slots=True)
class ModelRunnerOutput:
    sampled_token_ids: dict[str, list[int]]
    """Per scheduled request: the token sampled this step, or [] while its prompt is still
    being prefilled in chunks."""
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    """Per request that asked for logprobs and sampled a token this step."""
    prompt_logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    """Per request that asked for prompt logprobs: the positions computed this step."""
