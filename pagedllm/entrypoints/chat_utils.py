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
) -> list[PromptType]:
    if tokenizer is None:
        raise ValueError("LLM.chat needs a tokenizer; do not pass skip_tokenizer_init=True.")
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("The tokenizer has no chat template; pass chat_template=... to LLM.chat.")
    conversations = [messages] if messages and isinstance(messages[0], dict) else messages
    prompts: list[PromptType] = []
    for conversation in conversations:
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
        prompts.append({"prompt": text, "prompt_token_ids": token_ids})
    return prompts
