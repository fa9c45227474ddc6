"""What every front end of the engine sets up the same way: the tokenizer, the EOS id(s), the
generation_config.json defaults, the structured-output manager, and how the scheduler's
`Request`s are built from a processed prompt.

`LLMEngine` (offline, engine core in-process) and `AsyncLLM` (server, engine core in its own
process, core_proc.py) both use it, so the offline and the served paths stop at the same ids,
apply the same defaults and validate the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedllm.config import ModelConfig
from pagedllm.engine.generation_config import GenerationDefaults, load_generation_defaults
from pagedllm.engine.input_processor import ProcessedPrompt
from pagedllm.engine.request import Request
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.tokenizer import init_tokenizer
from pagedllm.structured_output import StructuredOutputManager


@dataclass(frozen=True)
class ModelFrontend:
    """The model's tokenizer and stop/sampling policy, read once per process."""

    tokenizer: PreTrainedTokenizerBase | None
    vocab_size: int
    eos_token_id: int | None
    """The tokenizer's EOS (reported as the EOS; ignore_eos switches it off)."""
    eos_token_ids: frozenset[int]
    """generation_config.json's further EOS ids (Llama 3.1's <|eom_id|>), eos_token_id excluded."""
    generation_defaults: GenerationDefaults

    @classmethod
    def load(cls, model_config: ModelConfig) -> ModelFrontend:
        tokenizer = init_tokenizer(model_config)
        eos_token_id = _eos_token_id(tokenizer, model_config.hf_config)
        defaults = load_generation_defaults(
            model_config.generation_config,
            None if model_config.gguf_file else model_config.model_path,
            getattr(model_config.hf_config, "eos_token_id", None),
            model_config.override_generation_config,
        )
        return cls(
            tokenizer=tokenizer,
            vocab_size=model_config.vocab_size,
            eos_token_id=eos_token_id,
            eos_token_ids=defaults.eos_token_ids - {eos_token_id},
            generation_defaults=defaults,
        )

    @property
    def all_eos_token_ids(self) -> frozenset[int]:
        return self.eos_token_ids | ({self.eos_token_id} if self.eos_token_id is not None else frozenset())

    def structured_output_manager(self) -> StructuredOutputManager:
        """A grammar may end only at an EOS: every id that stops generation."""
        return StructuredOutputManager(self.tokenizer, self.vocab_size, self.all_eos_token_ids)

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json sampling fields applied."""
        return SamplingParams(**self.generation_defaults.sampling_overrides)

    @property
    def sampling_overrides(self) -> dict[str, Any]:
        """SamplingParams field -> the model's default, for fields a request leaves unset."""
        return dict(self.generation_defaults.sampling_overrides)

    def make_request(
        self, request_id: str, processed: ProcessedPrompt, params: SamplingParams, arrival_time: float
    ) -> Request:
        """The scheduler's view of one completion of a processed prompt (with its multi-modal
        features and M-RoPE positions when it carries images or video)."""
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(processed.prompt_token_ids),
            sampling_params=params,
            eos_token_id=self.eos_token_id,
            max_tokens=processed.max_tokens,
            eos_token_ids=self.eos_token_ids,
            cache_salt=processed.cache_salt,
            arrival_time=arrival_time,
        )
        mm_inputs = processed.mm_inputs
        if mm_inputs is not None:
            request.mm_features = mm_inputs.features
            request.mrope_positions = mm_inputs.mrope_positions
            request.mrope_position_delta = mm_inputs.mrope_position_delta
        return request


def _eos_token_id(tokenizer: PreTrainedTokenizerBase | None, hf_config: Any) -> int | None:
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    eos = getattr(hf_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        return int(eos[0]) if eos else None
    return None if eos is None else int(eos)
