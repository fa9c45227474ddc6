"""Conversations to prompts with the tokenizer's chat template (LLM.chat)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedllm.inputs import PromptType

ChatMessage = dict[str, Any]


def conversations_to_prompts(
    tokenizer: PreTrainedTokenizerBase | None,
    messages: list[ChatMessage] | list[list[ChatMessage]],
    chat_template: str | None,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template_kwargs: dict[str, Any] | None,
    placeholders: dict[str, str] | None = None,
    mm_processor_kwargs: dict[str, Any] | None = None,
) -> list[PromptType]:
    """`placeholders`: the model's placeholder text per modality, which stands for each
    multi-modal content part in the templated text (empty for a text-only model)."""
    if tokenizer is None:
        raise ValueError("LLM.chat needs a tokenizer; do not pass skip_tokenizer_init=True.")
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("The tokenizer has no chat template; pass chat_template=... to LLM.chat.")
    conversations = [messages] if messages and isinstance(messages[0], dict) else messages
    prompts: list[PromptType] = []
    for conversation in conversations:
        conversation, mm_data = parse_content_parts(conversation, placeholders or {})
        text = tokenizer.apply_chat_template(
            conversation,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            **(chat_template_kwargs or {}),
        )
        # The template already holds the special tokens (BOS and role markers).
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        prompt: dict[str, Any] = {"prompt": text, "prompt_token_ids": token_ids}
        if mm_data:
            prompt["multi_modal_data"] = mm_data
        if mm_processor_kwargs is not None:
            prompt["mm_processor_kwargs"] = mm_processor_kwargs
        prompts.append(prompt)
    return prompts


def parse_content_parts(
    conversation: list[ChatMessage], placeholders: dict[str, str]
) -> tuple[list[ChatMessage], dict[str, list[Any]]]:
    """OpenAI content parts (text, image_url, image_pil, video) → messages with string
    content holding the model's placeholders, and the items by modality."""
    from pagedllm.multimodal.inputs import parse_chat_content

    parsed: list[ChatMessage] = []
    mm_data: dict[str, list[Any]] = {}
    for message in conversation:
        content = message.get("content")
        if content is None or isinstance(content, str):
            parsed.append(message)
            continue
        text, items = parse_chat_content(content, placeholders)
        for modality, values in items.items():
            mm_data.setdefault(modality, []).extend(values)
        parsed.append({**message, "content": text})
    return parsed, mm_data
