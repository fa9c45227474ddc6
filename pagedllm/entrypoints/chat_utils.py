"""Conversations to prompts with the tokenizer's chat template (LLM.chat)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from pagedllm.inputs import PromptType

logger = logging.getLogger(__name__)

ChatMessage = dict[str, Any]
ChatTemplateContentFormat = Literal["auto", "string", "openai"]
CONTENT_FORMATS = ("auto", "string", "openai")


def conversations_to_prompts(
    tokenizer: PreTrainedTokenizerBase | None,
    messages: list[ChatMessage] | list[list[ChatMessage]],
    chat_template: str | None,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template_kwargs: dict[str, Any] | None,
    placeholders: dict[str, str] | None = None,
    mm_processor_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
    content_format: ChatTemplateContentFormat = "auto",
) -> list[PromptType]:
    """`placeholders`: the model's placeholder text per modality, which stands for each
    multi-modal content part in the templated text (empty for a text-only model)."""
    if tokenizer is None:
        raise ValueError("LLM.chat needs a tokenizer; do not pass skip_tokenizer_init=True.")
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("The tokenizer has no chat template; pass chat_template=... to LLM.chat.")
    if continue_final_message and add_generation_prompt:
        # transformers' words; checked here so that every tokenizer says it the same way.
        raise ValueError(
            "continue_final_message and add_generation_prompt are not compatible. Use continue_final_message "
            "when you want the model to continue the final message, and add_generation_prompt when you want to "
            "add a header that will prompt it to start a new assistant message instead: pass "
            "add_generation_prompt=False with continue_final_message=True."
        )
    template_kwargs = dict(chat_template_kwargs or {})
    if tools is not None:
        template_kwargs["tools"] = tools
    content_format = resolve_content_format(tokenizer, chat_template, template_kwargs.get("tools"), content_format)
    conversations = [messages] if messages and isinstance(messages[0], dict) else messages
    prompts: list[PromptType] = []
    for conversation in conversations:
        conversation, mm_data = parse_content_parts(conversation, placeholders or {}, content_format)
        text = tokenizer.apply_chat_template(
            conversation,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **template_kwargs,
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


def resolve_content_format(
    tokenizer: PreTrainedTokenizerBase,
    chat_template: str | None,
    tools: Sequence[Any] | None,
    requested: ChatTemplateContentFormat,
) -> Literal["string", "openai"]:
    """vLLM's `chat_template_content_format`: "string" gives the template each message's
    content as one string, "openai" as a list of parts ({"type": "text", "text": ...},
    {"type": "image"}, {"type": "video"}); "auto" picks "openai" for a template that loops over
    a message's content (Qwen2-VL's, Gemma 3's) and "string" for any other."""
    if requested not in CONTENT_FORMATS:
        raise ValueError(
            f"chat_template_content_format={requested!r} is not supported; use one of {', '.join(CONTENT_FORMATS)}."
        )
    if requested != "auto":
        return requested
    try:
        template = tokenizer.get_chat_template(chat_template, tools)
    except ValueError:
        return "string"
    return detect_content_format(template)


def detect_content_format(template: str) -> Literal["string", "openai"]:
    """"openai" when the template has a `for` loop over `<message>['content']`,
    `<message>.content` or a variable named `content` (vLLM's rule, without its tracking of
    which variable holds a message); "string" otherwise, or when the template does not parse."""
    import jinja2
    from jinja2 import nodes

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        environment = _compile_jinja_template(template).environment  # knows transformers' own tags
        root = environment.parse(template)
    except Exception:  # noqa: BLE001 - a template jinja cannot read is rendered as before
        try:
            root = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
        except jinja2.TemplateError:
            logger.debug("The chat template does not parse; its messages get string content.")
            return "string"
    for loop in root.find_all(nodes.For):
        source = loop.iter
        if isinstance(source, nodes.Name) and source.name == "content":
            return "openai"
        if isinstance(source, nodes.Getattr) and source.attr == "content":
            return "openai"
        if isinstance(source, nodes.Getitem) and isinstance(source.arg, nodes.Const) and source.arg.value == "content":
            return "openai"
    return "string"


def parse_content_parts(
    conversation: list[ChatMessage],
    placeholders: dict[str, str],
    content_format: Literal["string", "openai"] = "string",
) -> tuple[list[ChatMessage], dict[str, list[Any]]]:
    """OpenAI content parts (text, image_url, image_pil, video) → messages for the template,
    and the items by modality in the order of the parts. "string": the content is one string
    holding the model's placeholders (then the text parts, as vLLM joins them). "openai": the
    content is a list of parts in their order, {"type": "image"} / {"type": "video"} where an
    item was, for a template that renders the placeholder of each part itself."""
    from pagedllm.multimodal.inputs import content_part_type, parse_chat_content

    parsed: list[ChatMessage] = []
    mm_data: dict[str, list[Any]] = {}
    for message in conversation:
        content = message.get("content")
        if content is None or (isinstance(content, str) and content_format == "string"):
            parsed.append(message)
            continue
        if content_format == "string":
            text, items = parse_chat_content(content, placeholders)
            for modality, values in items.items():
                mm_data.setdefault(modality, []).extend(values)
            parsed.append({**message, "content": text})
            continue
        parts: list[dict[str, Any]] = []
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if content_part_type(part) == "text":
                parts.append({"type": "text", "text": part["text"]})
                continue
            _, items = parse_chat_content([part], placeholders)  # one item: loads and checks it
            [(modality, values)] = items.items()
            mm_data.setdefault(modality, []).extend(values)
            parts.append({"type": modality})
        parsed.append({**message, "content": parts})
    return parsed, mm_data


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's content, or the template text itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as file:
            return file.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(
        f"--chat-template {value!r} is neither a file nor a Jinja template; pass a path to a "
        "template file or the template text (with {{ ... }} / {% ... %})."
    )
