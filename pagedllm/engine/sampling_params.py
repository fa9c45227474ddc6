"""Sampling parameters for text generation, with vLLM's names and meanings."""

from __future__ import annotations

import copy
import dataclasses
import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Re-exported: importable from here, as from vllm.sampling_params.
from pagedllm.engine.structured_outputs_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Temperatures below this are treated as greedy decoding, as in vLLM.
GREEDY_TEMPERATURE_EPS = 1e-5
# vLLM's _MAX_TEMP: a positive temperature below this divides logits into inf / nan, so it is
# raised to this value.
MIN_RANDOM_TEMPERATURE = 1e-2


class SamplingType(enum.IntEnum):
    """How a request picks its tokens (vLLM's enum of the same name)."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(enum.Enum):
    """vLLM's streaming modes. LLM.generate returns final outputs whatever the kind; the
    server's streaming reads it."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


# vLLM's name before 0.11; SamplingParams(guided_decoding=...) still works.
GuidedDecodingParams = StructuredOutputsParams

LogitsProcessor = Callable[..., Any]
"""(output_token_ids, logits) -> logits or (prompt_token_ids, output_token_ids, logits) ->
logits, over one request's float32 logits row."""


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
    logits_processors: list[LogitsProcessor] | None = None
    """Per-request callables applied to the logits row before sampling (in-process executor
    only: the mp and ray executors cannot send arbitrary callables to workers)."""
    truncate_prompt_tokens: int | None = None
    """Keep only the last k prompt tokens (-1: the last max_model_len - 1)."""
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    """How streamed outputs accumulate; LLM.generate returns final outputs whatever it is."""
    skip_clone: bool = False
    """Accepted for vLLM compatibility (cloning is cheap here)."""
    flat_logprobs: bool = False
    """Accepted for vLLM compatibility; logprobs are always a list of dicts."""
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output (JSON schema, regex, choice, grammar)."""
    guided_decoding: StructuredOutputsParams | None = None
    """vLLM's older name for structured_outputs."""
    logit_bias: dict[int, float] | None = None
    """Token id -> value added to its logit before sampling (clamped to [-100, 100])."""
    allowed_token_ids: list[int] | None = None
    """Only these tokens may be sampled."""
    extra_args: dict[str, Any] | None = None
    """Free-form arguments for custom extensions; carried along, unused by pagedllm."""
    bad_words: list[str] | None = None
    """Words that must not be generated: the last token of each is banned wherever the
    tokens before it were just generated."""
    skip_reading_prefix_cache: bool | None = None
    """Compute the whole prompt even where the prefix cache holds it (None: only when
    prompt_logprobs are asked for)."""
    logprob_token_ids: list[int] | None = None
    """vLLM's logprobs of chosen token ids: not implemented, so only None is accepted."""
    output_text_buffer_length: int = field(init=False, default=0)
    """Characters held back from streaming so a stop string is never emitted partially."""
    bad_words_token_ids: list[list[int]] | None = field(init=False, default=None, repr=False)
    """bad_words tokenized by the engine (with and without a leading space)."""

    def __post_init__(self) -> None:
        if isinstance(self.temperature, (int, float)) and 0 < self.temperature < MIN_RANDOM_TEMPERATURE:
            logger.warning(
                "temperature %s is less than %s, which may cause numerical errors nan or inf in tensors; "
                "it is raised to %s (temperature=0 means greedy).",
                self.temperature, MIN_RANDOM_TEMPERATURE, MIN_RANDOM_TEMPERATURE,
            )
            self.temperature = MIN_RANDOM_TEMPERATURE
        if self.seed == -1:
            self.seed = None
        # vLLM reads True as "the sampled token's logprob plus 1".
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("Pass structured_outputs or guided_decoding (its old name), not both.")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if self.logit_bias is not None:
            # JSON object keys are strings (the OpenAI API sends them so).
            try:
                self.logit_bias = {int(k): max(-100.0, min(100.0, float(v))) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError):
                raise ValueError(
                    f"SamplingParams.logit_bias must map token ids to numbers, got {self.logit_bias!r}."
                ) from None
        if self.bad_words is not None:
            self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words)
        if isinstance(self.output_kind, int):
            self.output_kind = RequestOutputKind(self.output_kind)
        if self.stop and not self.include_stop_str_in_output:
            self.output_text_buffer_length = max(len(s) for s in self.stop) - 1
        self.validate()
        if self.greedy:
            # As vLLM: greedy decoding ignores the filters, so they are reset to "off".
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    @classmethod
    def from_optional(cls, **kwargs: Any) -> SamplingParams:
        """vLLM's constructor for values that may be None (an OpenAI request's nulls): None
        means the field's default, except for max_tokens, where None means up to max_model_len."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
        return cls(**{
            name: value for name, value in kwargs.items()
            if value is not None or name == "max_tokens" or defaults.get(name, None) is None
        })

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def sampling_type(self) -> SamplingType:
        if self.greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    def validate(self) -> None:
        def fail(name: str, value: object, expected: str) -> None:
            raise ValueError(f"SamplingParams.{name} must be {expected}, got {value!r}.")

        # The messages of n, temperature, max_tokens, min_tokens, top_k, repetition_penalty and
        # stop start with vLLM's own words, so that code matching them keeps working.
        if not isinstance(self.n, int):
            raise ValueError(f"n must be an int, got {self.n!r}.")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                fail(name, value, "in [-2, 2]")
        if not math.isfinite(self.repetition_penalty):
            raise ValueError(f"repetition_penalty must be a finite number, got {self.repetition_penalty}.")
        if self.repetition_penalty <= 0.0:
            raise ValueError(
                f"repetition_penalty must be greater than zero, got {self.repetition_penalty}. 1.0 disables it."
            )
        if not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}. 0 means greedy.")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", self.top_p, "in (0, 1]")
        if not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}.")
        if self.top_k < 0:  # -1 became 0 in __post_init__
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}. -1 disables it too.")
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", self.min_p, "in [0, 1]")
        if self.seed is not None and not isinstance(self.seed, int):
            fail("seed", self.seed, "an integer, None or -1 (None)")
        if self.max_tokens is not None and not isinstance(self.max_tokens, int):
            raise ValueError(f"max_tokens must be an integer or None, got {self.max_tokens!r}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(
                f"max_tokens must be at least 1, got {self.max_tokens}. None generates up to max_model_len."
            )
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < -1):
                fail(name, value, "None, -1 (whole vocabulary) or an integer >= 0")
        if any(s == "" for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        if any(not isinstance(s, str) for s in self.stop):
            fail("stop", self.stop, "a string or a list of strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", self.stop_token_ids, "a list of non-negative token ids")
        if self.stop and not self.detokenize:
            fail("stop", self.stop, "empty when detokenize=False (stop strings need text)")
        self._validate_token_controls(fail)

    def _validate_token_controls(self, fail: Callable[[str, object, str], None]) -> None:
        if self.allowed_token_ids is not None and (
            not self.allowed_token_ids or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.allowed_token_ids)
        ):
            fail("allowed_token_ids", self.allowed_token_ids, "a non-empty list of token ids")
        if self.logit_bias is not None and any(t < 0 for t in self.logit_bias):
            fail("logit_bias", self.logit_bias, "a dict of non-negative token ids to biases")
        if self.bad_words is not None and any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            fail("bad_words", self.bad_words, "a list of non-empty strings")
        if self.logits_processors is not None and not all(callable(f) for f in self.logits_processors):
            fail("logits_processors", self.logits_processors, "a list of callables (output_ids, logits) -> logits")
        if self.truncate_prompt_tokens is not None and (
            isinstance(self.truncate_prompt_tokens, bool)
            or not isinstance(self.truncate_prompt_tokens, int)
            or self.truncate_prompt_tokens < -1
            or self.truncate_prompt_tokens == 0
        ):
            fail("truncate_prompt_tokens", self.truncate_prompt_tokens, "None, -1 or an integer >= 1")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            fail("structured_outputs", self.structured_outputs, "a StructuredOutputsParams")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            fail("extra_args", self.extra_args, "a dict or None")
        if self.logprob_token_ids is not None:
            fail("logprob_token_ids", self.logprob_token_ids,
                 "None: the logprobs of chosen tokens are not implemented (logprobs=k gives the k most likely)")

    @property
    def has_token_controls(self) -> bool:
        """Whether the sampler must edit this request's logits row beyond penalties."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words_token_ids or self.logits_processors)

    @property
    def all_stop_token_ids(self) -> set[int]:
        return set(self.stop_token_ids or ())

    def clone(self) -> SamplingParams:
        # Logits processors may hold state or unpicklable objects: shared, not copied.
        memo = {id(f): f for f in self.logits_processors or ()}
        return copy.deepcopy(self, memo)

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in self.__dataclass_fields__
            if name not in ("output_text_buffer_length", "bad_words_token_ids", "guided_decoding")
        )
        return f"SamplingParams({fields})"


@dataclass
class BeamSearchParams:
    """LLM.beam_search's parameters, as vLLM's."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.beam_width, bool) or not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"BeamSearchParams.beam_width must be an integer >= 1, got {self.beam_width!r}.")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"BeamSearchParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
        if self.temperature < 0:
            raise ValueError(f"BeamSearchParams.temperature must be >= 0, got {self.temperature!r}.")
