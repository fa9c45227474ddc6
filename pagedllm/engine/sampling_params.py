"""Sampling parameters for text generation, with vLLM's names and meanings."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

# Temperatures below this are treated as greedy decoding, as in vLLM.
GREEDY_TEMPERATURE_EPS = 1e-5


@dataclass
class SamplingParams:
    """How to sample the completion of one prompt.

    Every field means what it means in vLLM's ``SamplingParams``; ``validate`` runs on
    construction and raises ``ValueError`` naming the field, the value and the valid range.
    """

    n: int = 1
    """Number of completions to return for the prompt."""
    presence_penalty: float = 0.0
    """Added penalty (in [-2, 2]) for tokens that already appeared in the output."""
    frequency_penalty: float = 0.0
    """Penalty (in [-2, 2]) scaled by how often a token appeared in the output."""
    repetition_penalty: float = 1.0
    """Multiplicative penalty (> 0) for tokens in the prompt or the output; 1 disables it."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p."""
    top_k: int = 0
    """Keep the top_k most likely tokens; 0 or -1 disables it."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's."""
    seed: int | None = None
    """Per-request random seed; makes this request's sampling reproducible."""
    stop: str | list[str] | None = None
    """Strings that stop generation; they are not included in the output text."""
    stop_token_ids: list[int] | None = None
    """Token ids that stop generation (kept in token_ids, like EOS)."""
    ignore_eos: bool = False
    """Keep generating after the EOS token."""
    max_tokens: int | None = 16
    """Maximum number of tokens to generate; None means up to max_model_len."""
    min_tokens: int = 0
    """Minimum number of tokens before EOS or stop_token_ids may end the request."""
    logprobs: int | None = None
    """Number of most likely tokens whose log-probabilities are returned per output token,
    besides the sampled one. -1 means the whole vocabulary."""
    prompt_logprobs: int | None = None
    """Same as logprobs, for each prompt token."""
    detokenize: bool = True
    """Whether to decode the output tokens into text."""
    skip_special_tokens: bool = True
    """Whether to drop special tokens from the output text."""
    spaces_between_special_tokens: bool = True
    """Whether to put spaces between special tokens in the output text."""
    include_stop_str_in_output: bool = False
    """Whether a matched stop string stays at the end of the output text."""
    output_text_buffer_length: int = field(init=False, default=0)
    """Characters held back from streaming so a stop string is never emitted partially."""

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.stop and not self.include_stop_str_in_output:
            self.output_text_buffer_length = max(len(s) for s in self.stop) - 1
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    def validate(self) -> None:
        def fail(name: str, value: object, expected: str) -> None:
            raise ValueError(f"SamplingParams.{name} must be {expected}, got {value!r}.")

        if not isinstance(self.n, int) or self.n < 1:
            fail("n", self.n, "an integer >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                fail(name, value, "in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            fail("repetition_penalty", self.repetition_penalty, "> 0 (1 disables it)")
        if not self.temperature >= 0.0:
            fail("temperature", self.temperature, ">= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", self.top_p, "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", self.top_k, "an integer >= 1, or 0 / -1 to disable it")
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", self.min_p, "in [0, 1]")
        if self.seed is not None and not isinstance(self.seed, int):
            fail("seed", self.seed, "an integer or None")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            fail("max_tokens", self.max_tokens, "an integer >= 1 or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < -1):
                fail(name, value, "None, -1 (whole vocabulary) or an integer >= 0")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            fail("stop", self.stop, "a non-empty string or a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", self.stop_token_ids, "a list of non-negative token ids")
        if self.stop and not self.detokenize:
            fail("stop", self.stop, "empty when detokenize=False (stop strings need text)")

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in self.__dataclass_fields__
            if name != "output_text_buffer_length"
        )
        return f"SamplingParams({fields})"
