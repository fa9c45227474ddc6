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


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    multi_modal_data: NotRequired[dict[str, Any]]
    mm_processor_kwargs: NotRequired[dict[str, Any]]


PromptType = Union[str, TextPrompt, TokensPrompt]
