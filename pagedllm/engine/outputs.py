"""What `LLM.generate` returns, with vLLM's class and field names."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def finished(self) -> bool:
        return self.finish_reason is not None


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
