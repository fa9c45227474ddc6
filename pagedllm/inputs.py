"""Prompt types accepted by `LLM.generate`, named as in vLLM (`vllm.inputs`)."""

from __future__ import annotations

from typing import Any, TypedDict, Union

from typing_extensions import NotRequired


class TextPrompt(TypedDict):
    prompt: str
    multi_modal_data: NotRequired[dict[str, Any]]
    """{"image": PIL.Image | [PIL.Image, ...], "video": frames | [frames, ...]}: one item per
    placeholder in the prompt (multi-modal models only)."""
    mm_processor_kwargs: NotRequired[dict[str, Any]]
    """This prompt's processor arguments (e.g. max_pixels), over the engine's."""
    multi_modal_uuids: NotRequired[dict[str, Any]]
    """{"image": ["uuid-a", None, ...]}: the items' cache keys instead of their content hashes."""
    cache_salt: NotRequired[str]


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    multi_modal_data: NotRequired[dict[str, Any]]
    mm_processor_kwargs: NotRequired[dict[str, Any]]
    multi_modal_uuids: NotRequired[dict[str, Any]]
    cache_salt: NotRequired[str]


PromptType = Union[str, TextPrompt, TokensPrompt]
