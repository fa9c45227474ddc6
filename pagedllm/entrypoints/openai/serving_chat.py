"""POST /v1/chat/completions: the chat template over system/user/assistant messages."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.outputs import CompletionOutput, RequestOutput
from pagedllm.entrypoints.chat_utils import parse_content_parts, resolve_content_format
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogProbs,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    ChatTopLogprob,
    DeltaMessage,
    UsageInfo,
    request_id_of,
)
from pagedllm.entrypoints.openai.serving_engine import (
    OpenAIServing,
    RequestError,
    ServingOptions,
    error_body,
    prompt_logprobs_of,
    sse,
    token_text,
    top_entries,
)
from pagedllm.entrypoints.openai.streams import cancel_on_disconnect


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: AsyncLLM, served_model_names: list[str], chat_template: str | None,
                 options: ServingOptions | None = None) -> None:
        super().__init__(engine, served_model_names, options)
        self.chat_template = chat_template

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Any:
        self.check_model(request.model)
        self.check_stream_options(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise RequestError("top_logprobs needs logprobs=true.", param="top_logprobs")
        if request.continue_final_message and request.add_generation_prompt and (
                "add_generation_prompt" in request.model_fields_set):
            raise RequestError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                               param="continue_final_message")
        request_id = request_id_of("chatcmpl", raw_request.headers.get("X-Request-Id"), request.request_id)
        prompt_token_ids, prompt_text, mm_data = self.apply_chat_template(request)
        if not mm_data:  # truncating could cut an item's placeholders
            prompt_token_ids = self.truncate_prompt(prompt_token_ids, request.truncate_prompt_tokens)
        name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.resolve_max_tokens(len(prompt_token_ids), request.max_completion_tokens or request.max_tokens, name)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = self.sampling_params(request, max_tokens, logprobs, prompt_logprobs=request.prompt_logprobs)
        prompt: dict[str, Any] = {"prompt": prompt_text, "prompt_token_ids": prompt_token_ids}
        if mm_data:
            prompt["multi_modal_data"] = mm_data
        processed = self.process_input(prompt, params)
        stream = self.generate(processed, params, request_id)
        if request.stream:
            return StreamingResponse(self._stream(request, request_id, stream, len(processed.prompt_token_ids)),
                                     media_type="text/event-stream")
        final = await cancel_on_disconnect(self._last(stream), raw_request)
        if final is None:
            return JSONResponse({}, status_code=499)
        choices = [
            ChatCompletionChoice(
                index=completion.index,
                message=ChatResponseMessage(role=self._role(request), content=self._echoed(request) + completion.text),
                logprobs=self._logprobs(completion, 0, len(completion.token_ids), request),
                finish_reason=completion.finish_reason,
                stop_reason=completion.stop_reason,
                token_ids=list(completion.token_ids) if request.return_token_ids else None,
            )
            for completion in final.outputs
        ]
        return ChatCompletionResponse(
            id=request_id, model=self.model_name, choices=choices, usage=self.usage([final]),
            prompt_token_ids=list(final.prompt_token_ids) if request.return_token_ids else None,
            prompt_logprobs=prompt_logprobs_of(final),
        )

    def apply_chat_template(self, request: ChatCompletionRequest) -> tuple[list[int], str, dict[str, list[Any]]]:
        """The templated prompt's token ids and text, and the images (or video) its content
        parts carry, by modality, with the model's placeholders standing for them in the text."""
        if self.tokenizer is None:
            raise RequestError("Chat needs a tokenizer; the server runs with --skip-tokenizer-init.", param="messages")
        template = request.chat_template or self.chat_template
        if template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise RequestError(
                "The model's tokenizer has no chat template: start the server with "
                "--chat-template FILE_OR_STRING, or use /v1/completions.", param="messages",
            )
        messages = [message.model_dump(exclude_none=True) for message in request.messages]
        _check_media_urls(messages)
        template_kwargs = dict(request.chat_template_kwargs or {})
        if request.tools is not None:
            if request.tool_choice not in (None, "none", "auto"):
                raise RequestError(
                    f"tool_choice={request.tool_choice!r} is not supported: tools go to the chat template and the "
                    "reply is plain text (no tool-call parsing); use tool_choice 'auto' or 'none'.", param="tool_choice",
                )
            template_kwargs["tools"] = request.tools
        try:
            # --chat-template-content-format: content as one string or as OpenAI's parts.
            tools = template_kwargs.get("tools")
            content_format = resolve_content_format(self.tokenizer, template, tools, self.options.chat_template_content_format)
            conversation, mm_data = parse_content_parts(messages, self.placeholders(), content_format)
        except ValueError as error:
            raise RequestError(str(error), param="messages") from None
        try:
            text = self.tokenizer.apply_chat_template(
                conversation,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=request.add_generation_prompt and not request.continue_final_message,
                continue_final_message=request.continue_final_message,
                **template_kwargs,
            )
        except Exception as error:  # noqa: BLE001 - a template error is the request's fault
            raise RequestError(f"The chat template failed on these messages: {error}", param="messages") from None
        # The template holds the special tokens (BOS, role markers) itself, as in LLM.chat, unless
        # the request asks for add_special_tokens.
        return self.encode(text, add_special_tokens=request.add_special_tokens), text, mm_data

    def _echoed(self, request: ChatCompletionRequest) -> str:
        """vLLM's chat `echo`: the last message's text, when it has the answer's role (the
        answer then continues it); else ""."""
        if not request.echo:
            return ""
        last = request.messages[-1]
        if last.role != self._role(request):
            return ""
        if isinstance(last.content, list):
            return "\n".join(part.get("text", "") for part in last.content if part.get("type") == "text")
        return last.content or ""

    def _role(self, request: ChatCompletionRequest) -> str:
        """vLLM's: --response-role for a new answer, the last message's role when continuing it."""
        if request.add_generation_prompt:
            return self.options.response_role
        return request.messages[-1].role

    def placeholders(self) -> dict[str, str]:
        """The model's placeholder text per modality (none for a text-only model)."""
        mm_processor = self.engine.input_processor.mm_processor
        adapter = mm_processor.adapter if mm_processor is not None else None
        return {modality: adapter.placeholder_text(modality) for modality in adapter.modalities} if adapter else {}

    @staticmethod
    async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
        final = None
        async for output in stream:
            final = output
        assert final is not None
        return final

    def _logprobs(self, completion: CompletionOutput, start: int, end: int, request: ChatCompletionRequest) -> ChatLogProbs | None:
        if not request.logprobs:
            return None
        as_ids = self.tokens_as_ids(request)
        content = []
        for token_id, chosen, top in top_entries(completion, start, end, request.top_logprobs or 0):
            text = token_text(token_id, chosen, as_ids)
            content.append(ChatTokenLogprob(
                token=text, logprob=chosen.logprob, bytes=list(text.encode("utf-8")),
                top_logprobs=[
                    ChatTopLogprob(token=(top_text := token_text(t, lp, as_ids)), logprob=lp.logprob,
                                   bytes=list(top_text.encode("utf-8")))
                    for t, lp in top
                ],
            ))
        return ChatLogProbs(content=content)

    async def _stream(self, request: ChatCompletionRequest, request_id: str, stream: AsyncIterator[RequestOutput],
                      num_prompt_tokens: int) -> AsyncIterator[str]:
        created = int(time.time())
        model = self.model_name
        include_usage = request.stream_options is not None and request.stream_options.include_usage
        # As vLLM: per-chunk usage only together with include_usage.
        continuous_usage = include_usage and request.stream_options is not None and request.stream_options.continuous_usage_stats

        def chunk(choice: ChatStreamChoice, num_completion_tokens: int) -> str:
            usage = None
            if continuous_usage:
                usage = UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                                  total_tokens=num_prompt_tokens + num_completion_tokens)
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice], usage=usage))

        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        final: RequestOutput | None = None
        try:
            echoed = self._echoed(request)
            for index in range(request.n):
                yield chunk(ChatStreamChoice(index=index, delta=DeltaMessage(role=self._role(request), content="")), 0)
                if echoed:
                    yield chunk(ChatStreamChoice(index=index, delta=DeltaMessage(content=echoed)), 0)
            async for output in stream:
                final = output
                for completion in output.outputs:
                    index = completion.index
                    start_text, start_token = sent_text.get(index, 0), sent_tokens.get(index, 0)
                    end_token = len(completion.token_ids)
                    if end_token == start_token and completion.finish_reason is None:
                        continue
                    sent_text[index], sent_tokens[index] = len(completion.text), end_token
                    yield chunk(ChatStreamChoice(
                        index=index,
                        delta=DeltaMessage(content=completion.text[start_text:]),
                        logprobs=self._logprobs(completion, start_token, end_token, request),
                        finish_reason=completion.finish_reason,
                        stop_reason=completion.stop_reason,
                        token_ids=list(completion.token_ids[start_token:end_token]) if request.return_token_ids else None,
                    ), end_token)
            if include_usage and final is not None:
                yield sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[], usage=self.usage([final])))
        except RequestError as error:
            yield sse(error_body(str(error), error.status, error.param))
        except Exception as error:  # noqa: BLE001 - the stream has started: report in-band
            yield sse(error_body(f"{type(error).__name__}: {error}", HTTPStatus.INTERNAL_SERVER_ERROR))
        yield "data: [DONE]\n\n"


def _check_media_urls(messages: list[dict[str, Any]]) -> None:
    """Over HTTP only inline images (data: URLs) are read: a file path or a remote URL would let
    a client read the server's files or make it fetch from the network."""
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if part.get("type") == "image_url" and not str(url or "").startswith("data:"):
                raise RequestError(
                    "image_url must be a data: URL (data:image/png;base64,...); the server reads no "
                    "files or remote URLs.", param="messages",
                )
