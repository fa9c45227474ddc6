"""Runs a model's own processor on a prompt's multi-modal items and expands its placeholders.

`MultiModalProcessorAdapter` is what a family implements (one subclass under processors/):
how one item is processed, which token marks an item in the tokenized prompt, and which
tokens replace that mark. `MultiModalProcessor` does the rest for every family: limits
(`limit_mm_per_prompt`), placeholder/item count checks, processor kwargs (engine level,
overridden per request), the processed-input cache, and the `MultiModalFeature`s.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pagedllm.config import ModelConfig, MultiModalConfig
from pagedllm.multimodal.cache import ProcessedInputCache, item_key
from pagedllm.multimodal.inputs import MultiModalFeature, PlaceholderRange, uuids_of

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ProcessedItem:
    """One item after the processor: what the cache keeps."""

    data: dict[str, Any]
    """Tensors the model's embed_multimodal takes for this item."""
    num_embeds: int
    """Encoder output rows (= embedding placeholder tokens) the item gives."""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class MultiModalPrompt:
    prompt_token_ids: list[int]
    """Placeholders expanded."""
    features: list[MultiModalFeature]
    mrope_positions: np.ndarray | None = None
    """[3, num_prompt_tokens] int64 M-RoPE positions (Qwen2-VL family), else None."""
    mrope_position_delta: int = 0
    """Decode position p uses p + delta in every M-RoPE section."""


class MultiModalProcessorAdapter:
    """A family's processing. Subclasses set `modalities` and implement the methods that
    raise NotImplementedError; the defaults cover placeholders that are one token each."""

    modalities: tuple[str, ...] = ("image",)
    requires_unchunked_items: bool = False
    """True when an item's tokens attend to each other bidirectionally (Gemma 3): chunked
    prefill then never splits an item (MultiModalFeature.unchunked)."""

    def __init__(self, model_config: ModelConfig, tokenizer: Any) -> None:
        self.model_config = model_config
        self.hf_config = model_config.hf_config
        self.tokenizer = tokenizer

    def placeholder_text(self, modality: str) -> str:
        """What `LLM.chat` inserts in the text for one item (e.g. Qwen's
        "<|vision_start|><|image_pad|><|vision_end|>")."""
        raise NotImplementedError

    def prompt_text(self, text: str) -> str:
        """A prompt's text before it is tokenized: a family whose users mark items with text
        its tokenizer splits (InternVL2's "<image>") rewrites it to the one-token mark here.
        Default: unchanged."""
        return text

    def placeholder_token_id(self, modality: str) -> int:
        """The token that marks one item in the tokenized prompt (replaced by `replacement`)."""
        raise NotImplementedError

    def process(self, modality: str, item: Any, kwargs: Mapping[str, Any]) -> ProcessedItem:
        """Run the model's processor on one item with the merged processor kwargs."""
        raise NotImplementedError

    def replacement(self, modality: str, item: ProcessedItem) -> tuple[list[int], tuple[bool, ...] | None]:
        """The tokens replacing the item's mark, and which of them take encoder rows (None:
        all). Default: num_embeds copies of the mark."""
        return [self.placeholder_token_id(modality)] * item.num_embeds, None

    def dummy_item(self, modality: str, kwargs: Mapping[str, Any]) -> Any:
        """The item giving the most encoder work under these kwargs (for memory profiling)."""
        raise NotImplementedError

    def mrope_positions(
        self, token_ids: list[int], features: list[MultiModalFeature]
    ) -> tuple[np.ndarray, int] | None:
        """M-RoPE families: ([3, T] positions, decode delta). Others: None."""
        return None


def merge_processor_kwargs(engine_kwargs: Mapping[str, Any], request_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if request_kwargs is not None and not isinstance(request_kwargs, Mapping):
        raise TypeError(f"mm_processor_kwargs must be a dict, got {type(request_kwargs).__name__}.")
    return {**engine_kwargs, **(request_kwargs or {})}


class MultiModalProcessor:
    """Engine-side processing of prompts with multi-modal data, for one model."""

    def __init__(self, model_config: ModelConfig, tokenizer: Any) -> None:
        from pagedllm.multimodal.registry import get_processor_adapter_class

        mm_config = model_config.multimodal_config
        assert mm_config is not None, "not a multi-modal model"
        self.mm_config: MultiModalConfig = mm_config
        self.adapter = get_processor_adapter_class(model_config.architecture)(model_config, tokenizer)
        self.cache = ProcessedInputCache(mm_config.input_cache_bytes)
        self.num_processed_items = 0
        """Items run through the model's processor (cache hits do not count)."""

    def check_limits(self, items: Mapping[str, list[Any]]) -> None:
        for modality, values in items.items():
            if modality not in self.adapter.modalities:
                raise ValueError(
                    f"{self.adapter.model_config.architecture} does not take {modality} inputs; "
                    f"it takes: {', '.join(self.adapter.modalities)}."
                )
            limit = self.mm_config.limit_of(modality)
            if len(values) > limit:
                limits = {m: self.mm_config.limit_of(m) for m in self.adapter.modalities}
                off = " (0 turns the modality off)" if limit == 0 else ""
                raise ValueError(
                    f"The prompt has {len(values)} {modality} item(s), but at most {limit} {modality} "
                    f"item(s) per prompt are allowed{off}: limit_mm_per_prompt={limits}; send fewer "
                    f"items or raise limit_mm_per_prompt['{modality}']."
                )

    def process(
        self,
        token_ids: list[int],
        multi_modal_data: Mapping[str, Any],
        request_kwargs: Mapping[str, Any] | None = None,
        multi_modal_uuids: Mapping[str, Any] | None = None,
    ) -> MultiModalPrompt:
        items, uuids = uuids_of(multi_modal_uuids, multi_modal_data)
        self.check_limits(items)
        kwargs = merge_processor_kwargs(self.mm_config.mm_processor_kwargs, request_kwargs)
        marks = {m: self.adapter.placeholder_token_id(m) for m in self.adapter.modalities}
        for modality in self.adapter.modalities:
            num_marks = sum(1 for t in token_ids if t == marks[modality])
            num_items = len(items.get(modality, ()))
            if num_marks != num_items:
                raise ValueError(
                    f"The prompt has {num_marks} {modality} placeholder(s) but {num_items} {modality} "
                    f"item(s) in multi_modal_data; put one {self.adapter.placeholder_text(modality)!r} "
                    f"in the prompt per {modality}."
                )
        mark_to_modality = {token: modality for modality, token in marks.items()}
        next_index = dict.fromkeys(self.adapter.modalities, 0)
        new_ids: list[int] = []
        features: list[MultiModalFeature] = []
        for token in token_ids:
            modality = mark_to_modality.get(token)
            if modality is None:
                new_ids.append(token)
                continue
            index = next_index[modality]
            next_index[modality] += 1
            item = items[modality][index]
            uuid = uuids[modality][index] if modality in uuids else None
            if item is None:
                identifier, processed = self._cached_by_uuid(modality, index, uuid, kwargs)
            else:
                identifier = item_key(modality, item, uuid, kwargs)
                processed = self._process_cached(identifier, modality, item, kwargs)
            replacement, is_embed = self.adapter.replacement(modality, processed)
            placeholder = PlaceholderRange(len(new_ids), len(replacement), is_embed)
            assert placeholder.num_embeds == processed.num_embeds, (placeholder, processed.num_embeds)
            features.append(
                MultiModalFeature(
                    modality, identifier, processed.data, placeholder, dict(processed.extra),
                    unchunked=self.adapter.requires_unchunked_items,
                )
            )
            new_ids.extend(replacement)
        result = MultiModalPrompt(new_ids, features)
        mrope = self.adapter.mrope_positions(new_ids, features)
        if mrope is not None:
            result.mrope_positions, result.mrope_position_delta = mrope
        return result

    def _process_cached(self, key: str, modality: str, item: Any, kwargs: Mapping[str, Any]) -> ProcessedItem:
        cached = self.cache.get(key) if self.cache.capacity_bytes else None
        if cached is not None:
            return cached
        try:
            processed = self.adapter.process(modality, item, kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"Processing the {modality} failed with mm_processor_kwargs={dict(kwargs)}: {error}") from None
        self.num_processed_items += 1
        if self.cache.capacity_bytes:
            self.cache.put(key, processed)
        return processed

    def _cached_by_uuid(
        self, modality: str, index: int, uuid: str | None, kwargs: Mapping[str, Any]
    ) -> tuple[str, ProcessedItem]:
        """An item sent as None: (its key, the processed item cached under its uuid)."""
        where = f"multi_modal_data[{modality!r}][{index}] is None"
        if uuid is None:
            raise ValueError(
                f"{where} and has no uuid; send the {modality}, or give the uuid it was sent with in "
                f"multi_modal_uuids[{modality!r}][{index}]."
            )
        key = item_key(modality, None, uuid, kwargs)
        cached = self.cache.get(key) if self.cache.capacity_bytes else None
        if cached is None:
            off = " (the cache is off: mm_processor_cache_gb=0)" if not self.cache.capacity_bytes else ""
            raise ValueError(
                f"{where}, but no processed {modality} with uuid {uuid!r} (and these mm_processor_kwargs) is "
                f"cached{off}; send the {modality} itself with that uuid."
            )
        return key, cached

    def dummy_features(self, modality: str, kwargs: Mapping[str, Any] | None = None) -> ProcessedItem:
        """The processed largest item under the engine's kwargs (for profiling)."""
        merged = merge_processor_kwargs(self.mm_config.mm_processor_kwargs, kwargs)
        return self.adapter.process(modality, self.adapter.dummy_item(modality, merged), merged)
