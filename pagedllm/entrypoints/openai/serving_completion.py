"""POST /v1/completions: a string, a list of strings, or token-id prompt(s)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from pagedllm.engine.outputs import CompletionOutput, RequestOutput
from pagedllm.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    PromptLogprob,
    random_id,
)
from pagedllm.entrypoints.openai.serving_engine import (
    OpenAIServing,
    RequestError,
    cancel_on_disconnect,
    error_body,
    merge,
    sse,
    token_text,
    top_entries,
    usage_of,
)


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Any:
        self.check_model(request.model)
        if request.suffix is not None:
            raise RequestError("suffix is not supported.", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise RequestError(f"best_of must equal n ({request.n}) or be left out, got {request.best_of}.", param="best_of")
        request_id = request.request_id or random_id("cmpl")
        prompts = self._prompts(request.prompt)
        jobs = []
        for index, prompt in enumerate(prompts):
            max_tokens = self.resolve_max_tokens(len(prompt["prompt_token_ids"]), request.max_tokens)
            params = self.sampling_params(request, max_tokens, request.logprobs, prompt_logprobs=request.prompt_logprobs)
            processed = self.process_input(prompt, params)
            jobs.append((processed, params, f"{request_id}-{index}" if len(prompts) > 1 else request_id))
        streams = [self.generate(prompt, params, rid) for prompt, params, rid in jobs]
        if request.stream:
            return StreamingResponse(self._stream(request, request_id, streams), media_type="text/event-stream")
        finals = await cancel_on_disconnect(self._collect(streams), raw_request)
        if finals is None:
            return JSONResponse({}, status_code=499)
        return self._response(request, request_id, finals)

    def _prompts(self, prompt: Any) -> list[dict[str, Any]]:
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [list(prompt)]
        else:
            items = list(prompt)
        if not items:
            raise RequestError("prompt is empty: give a string, a list of strings, or token ids.", param="prompt")
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append({"prompt": item, "prompt_token_ids": self.encode(item)})
            else:
                prompts.append({"prompt_token_ids": list(item)})
        return prompts

    @staticmethod
    async def _collect(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        async for index, output in merge(streams):
            finals[index] = output
        return [finals[i] for i in range(len(streams))]

    def _response(self, request: CompletionRequest, request_id: str, finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for prompt_index, output in enumerate(finals):
            prefix = self._echo(request, output)
            for completion in output.outputs:
                choices.append(CompletionChoice(
                    index=prompt_index * request.n + completion.index,
                    text=prefix + completion.text,
                    logprobs=self._logprobs(completion, 0, len(completion.token_ids), request.logprobs, len(prefix)),
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                    token_ids=list(completion.token_ids) if request.return_token_ids else None,
                    prompt_token_ids=list(output.prompt_token_ids) if request.return_token_ids else None,
                    prompt_logprobs=_prompt_logprobs(output),
                ))
        return CompletionResponse(id=request_id, model=request.model or self.model_name, choices=choices,
                                  usage=usage_of(finals))

    def _echo(self, request: CompletionRequest, output: RequestOutput) -> str:
        if not request.echo:
            return ""
        if output.prompt is not None:
            return output.prompt
        return self.tokenizer.decode(output.prompt_token_ids) if self.tokenizer is not None else ""

    @staticmethod
    def _logprobs(completion: CompletionOutput, start: int, end: int, num_top: int | None, offset: int) -> CompletionLogProbs | None:
        if num_top is None:
            return None
        result = CompletionLogProbs()
        for token_id, chosen, top in top_entries(completion, start, end, num_top):
            text = token_text(token_id, chosen)
            result.tokens.append(text)
            result.token_logprobs.append(chosen.logprob)
            result.top_logprobs.append({token_text(t, lp): lp.logprob for t, lp in top})
            result.text_offset.append(offset)
            offset += len(text)
        return result

    async def _stream(self, request: CompletionRequest, request_id: str, streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[str]:
        created = int(time.time())
        model = request.model or self.model_name
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        text_offsets: dict[int, int] = {}
        finals: dict[int, RequestOutput] = {}
        include_usage = request.stream_options is not None and request.stream_options.include_usage
        try:
            async for prompt_index, output in merge(streams):
                finals[prompt_index] = output
                choices = []
                for completion in output.outputs:
                    index = prompt_index * request.n + completion.index
                    first = index not in sent_tokens
                    start_text, start_token = sent_text.get(index, 0), sent_tokens.get(index, 0)
                    end_token = len(completion.token_ids)
                    if end_token == start_token and completion.finish_reason is None and not (first and request.echo):
                        continue
                    prefix = self._echo(request, output) if first else ""
                    delta = prefix + completion.text[start_text:]
                    offset = text_offsets.get(index, 0) + len(prefix)
                    logprobs = self._logprobs(completion, start_token, end_token, request.logprobs, offset)
                    text_offsets[index] = offset + len(completion.text) - start_text
                    sent_text[index], sent_tokens[index] = len(completion.text), end_token
                    choices.append(CompletionChoice(
                        index=index, text=delta, logprobs=logprobs,
                        finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
                        token_ids=list(completion.token_ids[start_token:end_token]) if request.return_token_ids else None,
                        prompt_token_ids=list(output.prompt_token_ids) if request.return_token_ids and first else None,
                        prompt_logprobs=_prompt_logprobs(output) if first else None,
                    ))
                for choice in choices:
                    yield sse(CompletionStreamResponse(id=request_id, created=created, model=model, choices=[choice]))
            if include_usage:
                usage = usage_of([finals[i] for i in sorted(finals)])
                yield sse(CompletionStreamResponse(id=request_id, created=created, model=model, choices=[], usage=usage))
        except RequestError as error:
            yield sse(error_body(str(error), error.status, error.param))
        except Exception as error:  # noqa: BLE001 - the stream has started: report in-band
            from http import HTTPStatus

            yield sse(error_body(f"{type(error).__name__}: {error}", HTTPStatus.INTERNAL_SERVER_ERROR))
        yield "data: [DONE]\n\n"


def _prompt_logprobs(output: RequestOutput) -> list[dict[str, PromptLogprob] | None] | None:
    """vLLM's shape: per prompt token (None for the first), token id -> its Logprob."""
    if output.prompt_logprobs is None:
        return None
    return [
        None if row is None else {
            str(token_id): PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=lp.decoded_token)
            for token_id, lp in row.items()
        }
        for row in output.prompt_logprobs
    ]
