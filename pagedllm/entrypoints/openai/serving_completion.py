"""POST /v1/completions: a string, a list of strings, or token-id prompt(s)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from pagedllm.engine.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
    request_id_of,
)
from pagedllm.entrypoints.openai.serving_engine import (
    OpenAIServing,
    RequestError,
    error_body,
    prompt_logprobs_of,
    sse,
    token_text,
)
from pagedllm.entrypoints.openai.streams import cancel_on_disconnect, merge


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Any:
        self.check_model(request.model)
        self.check_stream_options(request)
        if request.suffix is not None:
            raise RequestError("suffix is not supported.", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise RequestError(f"best_of must equal n ({request.n}) or be left out, got {request.best_of}.", param="best_of")
        request_id = request_id_of("cmpl", raw_request.headers.get("X-Request-Id"), request.request_id)
        prompts = self._prompts(request.prompt, request.add_special_tokens)
        # echo with max_tokens=0 returns the prompt alone (OpenAI's and vLLM's): one token is
        # generated, as vLLM does, and dropped.
        max_tokens_asked = 1 if _echo_only(request) else request.max_tokens
        # echo + logprobs covers the prompt too: its logprobs are asked for, as vLLM does.
        prompt_logprobs = request.prompt_logprobs
        if prompt_logprobs is None and request.echo:
            prompt_logprobs = request.logprobs
        jobs = []
        for index, prompt in enumerate(prompts):
            prompt["prompt_token_ids"] = self.truncate_prompt(prompt["prompt_token_ids"], request.truncate_prompt_tokens)
            max_tokens = self.resolve_max_tokens(len(prompt["prompt_token_ids"]), max_tokens_asked)
            params = self.sampling_params(request, max_tokens, request.logprobs, prompt_logprobs=prompt_logprobs)
            processed = self.process_input(prompt, params)
            jobs.append((processed, params, f"{request_id}-{index}" if len(prompts) > 1 else request_id))
        streams = [self.generate(prompt, params, rid) for prompt, params, rid in jobs]
        if request.stream:
            return StreamingResponse(self._stream(request, request_id, streams), media_type="text/event-stream")
        finals = await cancel_on_disconnect(self._collect(streams), raw_request)
        if finals is None:
            return JSONResponse({}, status_code=499)
        return self._response(request, request_id, finals)

    def _prompts(self, prompt: Any, add_special_tokens: bool) -> list[dict[str, Any]]:
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
                prompts.append({"prompt": item, "prompt_token_ids": self.encode(item, add_special_tokens)})
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
            for completion in output.outputs:
                part = self._part(request, output, completion, True, 0, 0, len(completion.token_ids))
                logprobs = self._logprobs(request, part.token_ids, part.rows, 0)[0] if request.logprobs is not None else None
                choices.append(CompletionChoice(
                    index=prompt_index * request.n + completion.index,
                    text=part.text,
                    logprobs=logprobs,
                    finish_reason=part.finish_reason,
                    stop_reason=part.stop_reason,
                    token_ids=part.generated_ids if request.return_token_ids else None,
                    prompt_token_ids=list(output.prompt_token_ids) if request.return_token_ids else None,
                    prompt_logprobs=prompt_logprobs_of(output),
                ))
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                  usage=self.usage(finals, not _echo_only(request)))

    def _part(self, request: CompletionRequest, output: RequestOutput, completion: CompletionOutput,
              first: bool, start_text: int, start: int, end: int) -> _Part:
        """A completion's text from start_text and its tokens and logprob rows at [start, end),
        with the prompt in front in the first part of an echo (the prompt alone for max_tokens=0)."""
        prompt_ids = list(output.prompt_token_ids)
        prompt_rows = output.prompt_logprobs if output.prompt_logprobs is not None else [None] * len(prompt_ids)
        if _echo_only(request):
            return _Part(self._echo(output), prompt_ids, list(prompt_rows), [], "length")
        rows = (completion.logprobs or [])[start:end]
        generated_ids = list(completion.token_ids[start:end])
        part = _Part(completion.text[start_text:], generated_ids, rows, generated_ids, completion.finish_reason,
                     completion.stop_reason)
        if first and request.echo:
            part.text = self._echo(output) + part.text
            part.token_ids = prompt_ids + generated_ids
            part.rows = list(prompt_rows) + rows
        return part

    def _echo(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        return self.tokenizer.decode(output.prompt_token_ids) if self.tokenizer is not None else ""

    def _logprobs(self, request: CompletionRequest, token_ids: list[int], rows: list[dict[int, Logprob] | None],
                  offset: int) -> tuple[CompletionLogProbs, int]:
        """OpenAI's completion logprobs, and the text offset after them. As in vLLM, each
        top_logprobs entry is the sampled token plus the top `logprobs` ones (the engine's dicts
        hold the sampled token first), and the first prompt token has null logprobs."""
        num_top = request.logprobs or 0
        as_ids = self.tokens_as_ids(request)
        result = CompletionLogProbs()
        for token_id, row in zip(token_ids, rows):
            if row is None:
                text = f"token_id:{token_id}" if as_ids or self.tokenizer is None else self.tokenizer.decode([token_id])
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
            else:
                text = token_text(token_id, row[token_id], as_ids)
                result.token_logprobs.append(_finite(row[token_id].logprob))
                entries = list(row.items()) if num_top < 0 else list(row.items())[: num_top + 1]
                result.top_logprobs.append({token_text(t, lp, as_ids): _finite(lp.logprob) for t, lp in entries})
            result.tokens.append(text)
            result.text_offset.append(offset)
            offset += len(text)
        return result, offset

    async def _stream(self, request: CompletionRequest, request_id: str, streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[str]:
        created = int(time.time())
        model = self.model_name
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        text_offsets: dict[int, int] = {}
        finals: dict[int, RequestOutput] = {}
        include_usage = request.stream_options is not None and request.stream_options.include_usage
        # As vLLM: per-chunk usage only together with include_usage.
        continuous_usage = include_usage and request.stream_options is not None and request.stream_options.continuous_usage_stats
        echo_only = _echo_only(request)
        try:
            async for prompt_index, output in merge(streams):
                finals[prompt_index] = output
                choices = []
                for completion in output.outputs:
                    index = prompt_index * request.n + completion.index
                    first = index not in sent_tokens
                    start_text, start_token = sent_text.get(index, 0), sent_tokens.get(index, 0)
                    end_token = len(completion.token_ids)
                    if echo_only and completion.finish_reason is None:
                        continue
                    # Prompt logprobs are complete once the first token exists.
                    prompt_pending = output.prompt_logprobs is not None and end_token == 0
                    echo_now = first and request.echo and not prompt_pending
                    if end_token == start_token and completion.finish_reason is None and not echo_now:
                        continue
                    part = self._part(request, output, completion, first, start_text, start_token, end_token)
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs, text_offsets[index] = self._logprobs(request, part.token_ids, part.rows,
                                                                       text_offsets.get(index, 0))
                    sent_text[index], sent_tokens[index] = len(completion.text), end_token
                    usage = None
                    if continuous_usage:
                        num_prompt, num_completion = len(output.prompt_token_ids), 0 if echo_only else end_token
                        usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_completion,
                                          total_tokens=num_prompt + num_completion)
                    choices.append((usage, CompletionChoice(
                        index=index, text=part.text, logprobs=logprobs,
                        finish_reason=part.finish_reason, stop_reason=part.stop_reason,
                        token_ids=part.generated_ids if request.return_token_ids else None,
                        prompt_token_ids=list(output.prompt_token_ids) if request.return_token_ids and first else None,
                        prompt_logprobs=prompt_logprobs_of(output) if first else None,
                    )))
                for usage, choice in choices:
                    yield sse(CompletionStreamResponse(id=request_id, created=created, model=model, choices=[choice], usage=usage))
            if include_usage:
                usage = self.usage([finals[i] for i in sorted(finals)], not echo_only)
                yield sse(CompletionStreamResponse(id=request_id, created=created, model=model, choices=[], usage=usage))
        except RequestError as error:
            yield sse(error_body(str(error), error.status, error.param))
        except Exception as error:  # noqa: BLE001 - the stream has started: report in-band
            from http import HTTPStatus

            yield sse(error_body(f"{type(error).__name__}: {error}", HTTPStatus.INTERNAL_SERVER_ERROR))
        yield "data: [DONE]\n\n"


@dataclass(slots=True)
class _Part:
    """What one choice (or one streamed chunk of it) returns."""

    text: str
    token_ids: list[int]
    """The tokens the logprobs cover: the prompt's first when echoing."""
    rows: list[dict[int, Logprob] | None]
    generated_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None


def _echo_only(request: CompletionRequest) -> bool:
    return request.echo and request.max_tokens == 0


def _finite(logprob: float) -> float:
    # JSON has no -inf; vLLM sends -9999.0 for it.
    return max(logprob, -9999.0)
