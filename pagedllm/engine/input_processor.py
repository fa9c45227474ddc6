"""Turns a user's prompt into token ids and checks it before any work starts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from pagedllm.config import ModelConfig
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.token_controls import validate_token_controls
from pagedllm.inputs import PromptType

if TYPE_CHECKING:
    from pagedllm.structured_output import StructuredOutputManager


# Keys a prompt dict may carry (vLLM's TextPrompt / TokensPrompt / EmbedsPrompt keys); the
# multi-modal ones are passed along for the multi-modal processor.
PROMPT_KEYS = frozenset(
    {"prompt", "prompt_token_ids", "token_type_ids", "multi_modal_data", "mm_processor_kwargs",
     "multi_modal_uuids", "cache_salt"}
)


@dataclass(frozen=True, slots=True)
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]
    max_tokens: int
    """sampling_params.max_tokens capped so prompt + output fits max_model_len."""
    cache_salt: str | None = None
    """Separates this prompt's prefix-cache namespace from prompts with another salt."""
    extra: dict | None = None
    """Other keys of the prompt dict (multi_modal_data, mm_processor_kwargs, ...)."""
    mm_inputs: Any = None
    """A multimodal.processing.MultiModalPrompt when the prompt carried multi_modal_data
    (prompt_token_ids then hold the expanded placeholders)."""


class InputProcessor:
    def __init__(
        self, model_config: ModelConfig, tokenizer: PreTrainedTokenizerBase | None,
        structured_output_manager: StructuredOutputManager | None = None,
        sampler_process: str | None = None,
    ) -> None:
        """`structured_output_manager` compiles each request's grammar while its prompt is
        checked, so a bad schema fails before any work. `sampler_process`: None when the
        sampler runs in this process; else where it runs, for the error that refuses
        per-request logits_processors (callables do not cross processes)."""
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.structured_output_manager = structured_output_manager
        self.sampler_process = sampler_process
        self.mm_processor = None
        if model_config.multimodal_config is not None:
            from pagedllm.multimodal.processing import MultiModalProcessor

            self.mm_processor = MultiModalProcessor(model_config, tokenizer)

    def process(self, prompt: PromptType, params: SamplingParams,
                tokenization_kwargs: dict[str, Any] | None = None) -> ProcessedPrompt:
        """Tokenize and validate; raises ValueError naming what is wrong and what would work.
        A list of token ids is a prompt of those tokens. `tokenization_kwargs` go to the
        tokenizer's encode (e.g. add_special_tokens, truncation with max_length)."""
        cache_salt, extra = self._check_keys(prompt)
        text, token_ids = self._tokenize(prompt, tokenization_kwargs)
        mm_inputs = self._process_multimodal(prompt, token_ids)
        if mm_inputs is not None:
            token_ids = mm_inputs.prompt_token_ids
        else:
            # A multi-modal prompt is not truncated: that could cut an item's placeholders.
            token_ids = self._truncate(token_ids, params.truncate_prompt_tokens)
        self._validate(token_ids, params)
        if params.logits_processors and self.sampler_process is not None:
            # A callable that cannot be rebuilt there would stop the worker, and every request with it.
            raise ValueError(
                f"SamplingParams.logits_processors run in the sampler's process, but it is {self.sampler_process}; "
                "drop logits_processors (use logit_bias, allowed_token_ids or bad_words), or use "
                "LLM(..., tensor_parallel_size=1) with the default in-process executor."
            )
        validate_token_controls(params, self.tokenizer, self.model_config.vocab_size)
        if self.structured_output_manager is not None:
            self.structured_output_manager.validate(params)
        room = self.model_config.max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        return ProcessedPrompt(
            prompt=text, prompt_token_ids=token_ids, max_tokens=max_tokens, cache_salt=cache_salt, extra=extra,
            mm_inputs=mm_inputs,
        )

    def as_token_prompt(self, prompt: PromptType) -> dict[str, Any]:
        """The prompt as a token-id prompt dict, its multi-modal keys kept: the ids are those
        before the items' placeholders are expanded (beam search extends them step by step)."""
        _, token_ids = self._tokenize(prompt, None)
        extra = {k: v for k, v in prompt.items() if k not in ("prompt", "prompt_token_ids")} if isinstance(
            prompt, Mapping) else {}
        return {**extra, "prompt_token_ids": token_ids}

    @staticmethod
    def _check_keys(prompt: PromptType) -> tuple[str | None, dict | None]:
        if not isinstance(prompt, Mapping):
            return None, None
        unknown = sorted(set(prompt) - PROMPT_KEYS)
        if unknown:
            raise ValueError(
                f"Unknown key(s) {unknown} in the prompt dict; allowed keys: {sorted(PROMPT_KEYS)}."
            )
        cache_salt = prompt.get("cache_salt")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string, got {cache_salt!r}.")
        extra = {k: v for k, v in prompt.items() if k not in ("prompt", "prompt_token_ids", "cache_salt")}
        return cache_salt, extra or None

    def _truncate(self, token_ids: list[int], truncate_prompt_tokens: int | None) -> list[int]:
        if truncate_prompt_tokens is None:
            return token_ids
        keep = self.model_config.max_model_len - 1 if truncate_prompt_tokens == -1 else truncate_prompt_tokens
        return token_ids[-keep:] if len(token_ids) > keep else token_ids

    def _process_multimodal(self, prompt: PromptType, token_ids: list[int]) -> Any:
        if not isinstance(prompt, Mapping):
            return None
        data = prompt.get("multi_modal_data")
        request_kwargs = prompt.get("mm_processor_kwargs")
        if self.mm_processor is None:
            if data:
                raise ValueError(
                    f"multi_modal_data was given, but {self.model_config.architecture or 'this model'} "
                    "is a text-only model; use a multi-modal model (e.g. Qwen2-VL) or drop the data."
                )
            return None
        uuids = prompt.get("multi_modal_uuids")
        if data is None and request_kwargs is None and uuids is None and not self._has_placeholders(token_ids):
            return None
        return self.mm_processor.process(token_ids, data or {}, request_kwargs, uuids)

    def _has_placeholders(self, token_ids: list[int]) -> bool:
        adapter = self.mm_processor.adapter
        marks = {adapter.placeholder_token_id(m) for m in adapter.modalities}
        return any(t in marks for t in token_ids)

    def _tokenize(self, prompt: PromptType, tokenization_kwargs: dict[str, Any] | None) -> tuple[str | None, list[int]]:
        if tokenization_kwargs is not None and not isinstance(tokenization_kwargs, Mapping):
            raise ValueError(
                f"tokenization_kwargs must be a dict of tokenizer arguments (e.g. {{'add_special_tokens': False}}), "
                f"got {tokenization_kwargs!r}."
            )
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = None
        elif isinstance(prompt, (list, tuple)):
            text, token_ids = None, prompt
        elif isinstance(prompt, Mapping):
            text = prompt.get("prompt")
            token_ids = prompt.get("prompt_token_ids")
            if text is None and token_ids is None:
                raise ValueError(
                    f"A prompt dict needs 'prompt' (text) or 'prompt_token_ids', got keys {sorted(prompt)}."
                )
        else:
            raise TypeError(
                f"A prompt must be a str, a list of token ids, {{'prompt': str}} or {{'prompt_token_ids': [...]}}, "
                f"got {type(prompt).__name__}."
            )
        if token_ids is not None:
            if isinstance(token_ids, (str, bytes)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in token_ids
            ):
                raise ValueError("prompt_token_ids must be a list of integers.")
            return text, list(token_ids)
        if self.tokenizer is None:
            raise ValueError(
                "skip_tokenizer_init=True, so prompts must be token ids: pass "
                "{'prompt_token_ids': [...]} instead of text."
            )
        if not isinstance(text, str):
            raise TypeError(f"'prompt' must be a str, got {type(text).__name__}.")
        # The output keeps the user's text; only what is tokenized takes the family's marks.
        to_tokenize = text if self.mm_processor is None else self.mm_processor.adapter.prompt_text(text)
        try:
            return text, list(self.tokenizer.encode(to_tokenize, **(tokenization_kwargs or {})))
        except TypeError as error:
            raise ValueError(f"tokenization_kwargs={tokenization_kwargs!r} were refused by the tokenizer: {error}") from None

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        max_model_len = self.model_config.max_model_len
        if not token_ids:
            raise ValueError("The prompt is empty: give at least one token.")
        if len(token_ids) >= max_model_len:
            # vLLM's words first (tests match on them), then what would work.
            raise ValueError(
                f"The decoder prompt (length {len(token_ids)}) plus the number of requested output tokens "
                f"(at least 1) is longer than the maximum model length of {max_model_len}: the prompt has "
                f"{len(token_ids)} tokens, but max_model_len is {max_model_len} and at least one token must "
                "remain for the output; shorten the prompt or raise max_model_len."
            )
        vocab_size = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"Token id {bad[0]} is outside the model's vocabulary (0..{vocab_size - 1})."
            )
        bad_stop = [t for t in params.stop_token_ids if t >= vocab_size]
        if bad_stop:
            raise ValueError(
                f"stop_token_ids has id {bad_stop[0]} outside the vocabulary (0..{vocab_size - 1})."
            )
        max_logprobs = self.model_config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            requested = getattr(params, name)
            if requested is None or max_logprobs == -1:
                continue
            if requested == -1 or requested > max_logprobs:
                raise ValueError(
                    f"SamplingParams.{name}={requested} exceeds max_logprobs={max_logprobs}; ask "
                    f"for at most {max_logprobs} or raise max_logprobs in LLM(...)."
                )
