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
from pagedllm.entrypoints.chat_utils import parse_content_parts
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
    random_id,
)
from pagedllm.entrypoints.openai.serving_engine import (
    OpenAIServing,
    RequestError,
    cancel_on_disconnect,
    error_body,
    sse,
    token_text,
    top_entries,
    usage_of,
)


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: AsyncLLM, served_model_names: list[str], chat_template: str | None) -> None:
        super().__init__(engine, served_model_names)
        self.chat_template = chat_template

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Any:
        self.check_model(request.model)
        if request.top_logprobs is not None and not request.logprobs:
            raise RequestError("top_logprobs needs logprobs=true.", param="top_logprobs")
        request_id = request.request_id or random_id("chatcmpl")
        prompt_token_ids, prompt_text, mm_data = self._apply_chat_template(request)
        name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.resolve_max_tokens(len(prompt_token_ids), request.max_completion_tokens or request.max_tokens, name)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = self.sampling_params(request, max_tokens, logprobs)
        prompt: dict[str, Any] = {"prompt": prompt_text, "prompt_token_ids": prompt_token_ids}
        if mm_data:
            prompt["multi_modal_data"] = mm_data
        processed = self.process_input(prompt, params)
        stream = self.generate(processed, params, request_id)
        if request.stream:
            return StreamingResponse(self._stream(request, request_id, stream), media_type="text/event-stream")
        final = await cancel_on_disconnect(self._last(stream), raw_request)
        if final is None:
            return JSONResponse({}, status_code=499)
        choices = [
            ChatCompletionChoice(
                index=completion.index,
                message=ChatResponseMessage(content=completion.text),
                logprobs=self._logprobs(completion, 0, len(completion.token_ids), request),
                finish_reason=completion.finish_reason,
                stop_reason=completion.stop_reason,
                token_ids=list(completion.token_ids) if request.return_token_ids else None,
            )
            for completion in final.outputs
        ]
        return ChatCompletionResponse(
            id=request_id, model=request.model or self.model_name, choices=choices, usage=usage_of([final]),
            prompt_token_ids=list(final.prompt_token_ids) if request.return_token_ids else None,
        )

    def _apply_chat_template(self, request: ChatCompletionRequest) -> tuple[list[int], str, dict[str, list[Any]]]:
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
        try:
            conversation, mm_data = parse_content_parts(messages, self.placeholders())
        except ValueError as error:
            raise RequestError(str(error), param="messages") from None
        try:
            text = self.tokenizer.apply_chat_template(
                conversation,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=request.add_generation_prompt and not request.continue_final_message,
                continue_final_message=request.continue_final_message,
                **(request.chat_template_kwargs or {}),
            )
        except Exception as error:  # noqa: BLE001 - a template error is the request's fault
            raise RequestError(f"The chat template failed on these messages: {error}", param="messages") from None
        # The template holds the special tokens (BOS, role markers) itself, as in LLM.chat.
        return self.encode(text, add_special_tokens=False), text, mm_data

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

    @staticmethod
    def _logprobs(completion: CompletionOutput, start: int, end: int, request: ChatCompletionRequest) -> ChatLogProbs | None:
        if not request.logprobs:
            return None
        content = []
        for token_id, chosen, top in top_entries(completion, start, end, request.top_logprobs or 0):
            text = token_text(token_id, chosen)
            content.append(ChatTokenLogprob(
                token=text, logprob=chosen.logprob, bytes=list(text.encode("utf-8")),
                top_logprobs=[
                    ChatTopLogprob(token=token_text(t, lp), logprob=lp.logprob, bytes=list(token_text(t, lp).encode("utf-8")))
                    for t, lp in top
                ],
            ))
        return ChatLogProbs(content=content)

    async def _stream(self, request: ChatCompletionRequest, request_id: str, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        created = int(time.time())
        model = request.model or self.model_name
        include_usage = request.stream_options is not None and request.stream_options.include_usage

        def chunk(choice: ChatStreamChoice) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice]))

        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        final: RequestOutput | None = None
        try:
            for index in range(request.n):
                yield chunk(ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content="")))
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
                    ))
            if include_usage and final is not None:
                yield sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[], usage=usage_of([final])))
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
