"""What both generation endpoints share: the server's options, model check, errors in OpenAI's
shape, sampling parameters from a request body, prompt length checks, usage and logprobs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.input_processor import ProcessedPrompt
from pagedllm.engine.outputs import CompletionOutput, RequestOutput
from pagedllm.engine.sampling_params import SamplingParams, StructuredOutputsParams
from pagedllm.entrypoints.openai.protocol import (
    ErrorInfo,
    ErrorResponse,
    PromptLogprob,
    PromptTokenUsageInfo,
    SamplingFields,
    UsageInfo,
)
from pagedllm.entrypoints.openai.request_logger import RequestLogger

# Request fields passed to SamplingParams as they are, and those that fall back to the model's
# generation_config.json defaults when the client leaves them unset.
_PASSED_FIELDS = (
    "n", "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output", "logit_bias",
    "allowed_token_ids", "bad_words",
)
_DEFAULTED_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True, slots=True)
class ServingOptions:
    """The `serve` flags the endpoints read, with vLLM's names and defaults."""

    response_role: str = "assistant"
    enable_prompt_tokens_details: bool = False
    return_tokens_as_token_ids: bool = False
    chat_template_content_format: str = "auto"
    request_logger: RequestLogger | None = None


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI error body with this status."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


_ERROR_TYPES = {
    HTTPStatus.BAD_REQUEST: "BadRequestError",
    HTTPStatus.UNAUTHORIZED: "AuthenticationError",
    HTTPStatus.NOT_FOUND: "NotFoundError",
    HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
    HTTPStatus.INTERNAL_SERVER_ERROR: "InternalServerError",
}


def error_body(message: str, status: HTTPStatus, param: str | None = None) -> dict[str, Any]:
    error = ErrorInfo(message=message, type=_ERROR_TYPES.get(status, status.phrase), param=param, code=int(status))
    return ErrorResponse(error=error).model_dump()


def error_response(message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=int(status))


def sse(payload: Any) -> str:
    """One server-sent event; `payload` is a pydantic model or a dict."""
    text = payload.model_dump_json(exclude_unset=False) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {text}\n\n"


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, served_model_names: list[str], options: ServingOptions | None = None) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.options = options or ServingOptions()
        self.max_model_len = engine.model_config.max_model_len
        self.tokenizer = engine.tokenizer
        self.default_sampling = engine.frontend.sampling_overrides
        """The model's generation_config.json sampling fields: defaults for unset fields."""

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise RequestError(
                f"The model `{model}` does not exist; this server serves {self.served_model_names}.",
                HTTPStatus.NOT_FOUND, "model",
            )

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @staticmethod
    def check_stream_options(request: SamplingFields) -> None:
        # vLLM refuses a non-empty stream_options on a request that does not stream.
        if request.stream_options is not None and request.stream_options.model_fields_set and not request.stream:
            raise RequestError("Stream options can only be defined when `stream=True`.", param="stream_options")

    def tokens_as_ids(self, request: SamplingFields) -> bool:
        """Logprob tokens as "token_id:{id}": the request's return_tokens_as_token_ids, else the
        server's --return-tokens-as-token-ids."""
        if request.return_tokens_as_token_ids is not None:
            return request.return_tokens_as_token_ids
        return self.options.return_tokens_as_token_ids

    def usage(self, outputs: list[RequestOutput], count_completion_tokens: bool = True) -> UsageInfo:
        """usage_of, with prompt_tokens_details.cached_tokens under --enable-prompt-tokens-details."""
        usage = usage_of(outputs, count_completion_tokens)
        cached = sum(o.num_cached_tokens or 0 for o in outputs)
        if self.options.enable_prompt_tokens_details and cached:
            usage.prompt_tokens_details = PromptTokenUsageInfo(cached_tokens=cached)
        return usage

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("The server runs with --skip-tokenizer-init: send prompts as token ids.", param="prompt")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def truncate_prompt(self, token_ids: list[int], truncate_prompt_tokens: int | None) -> list[int]:
        """vLLM's truncate_prompt_tokens: the prompt's last k tokens (-1: max_model_len - 1)."""
        if truncate_prompt_tokens is None:
            return token_ids
        if truncate_prompt_tokens == -1:
            keep = self.max_model_len - 1
        elif 1 <= truncate_prompt_tokens < self.max_model_len:
            keep = truncate_prompt_tokens
        else:
            raise RequestError(
                f"truncate_prompt_tokens={truncate_prompt_tokens} must be -1 (as many as fit) or between 1 and "
                f"{self.max_model_len - 1} (max_model_len {self.max_model_len} less one output token).",
                param="truncate_prompt_tokens",
            )
        return token_ids[-keep:]

    def resolve_max_tokens(self, num_prompt_tokens: int, max_tokens: int | None, name: str = "max_tokens") -> int:
        """max_tokens, capped as vLLM caps it by the model's generation_config max_new_tokens,
        or all the room left when neither is set; a 400 saying by how much the request is too
        long otherwise."""
        room = self.max_model_len - num_prompt_tokens
        if room < 1:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"prompt has {num_prompt_tokens} tokens, {1 - room} more than fit with at least one "
                "output token. Please reduce the length of the prompt.",
                param="prompt" if name == "max_tokens" else "messages",
            )
        if max_tokens is not None and max_tokens > room:
            raise RequestError(
                f"'{name}' is too large: {max_tokens}. This model's maximum context length is "
                f"{self.max_model_len} tokens and your request has {num_prompt_tokens} input tokens "
                f"({max_tokens} > {self.max_model_len} - {num_prompt_tokens}), "
                f"{max_tokens - room} tokens too many. Please reduce the length of the prompt or {name}.",
                param=name,
            )
        limits = (room, max_tokens, self.default_sampling.get("max_tokens"))
        return min(limit for limit in limits if limit is not None)

    def sampling_params(self, request: SamplingFields, max_tokens: int, logprobs: int | None, **extra: Any) -> SamplingParams:
        """The SamplingParams of a request body; a bad value is a 400 naming the field. Fields
        the client leaves unset take the model's generation_config.json defaults, as vLLM's
        server does, then SamplingParams' own."""
        if request.use_beam_search:
            raise RequestError("use_beam_search is not supported by this server: it samples (the offline "
                               "LLM.beam_search() has beam search); leave use_beam_search false.",
                               param="use_beam_search")
        defaults = self.default_sampling
        fields: dict[str, Any] = {name: getattr(request, name) for name in _PASSED_FIELDS}
        fields.update(max_tokens=max_tokens, logprobs=logprobs, **extra)
        for name in _DEFAULTED_FIELDS:
            value = getattr(request, name)
            if value is None:
                value = defaults.get(name)
            if value is not None:
                fields[name] = value
        structured = self._structured_outputs(request)
        if structured is not None:
            fields["structured_outputs"] = structured
        try:
            return SamplingParams(**fields)
        except (ValueError, TypeError) as error:
            raise RequestError(str(error).replace("SamplingParams.", "")) from None

    @staticmethod
    def _structured_outputs(request: SamplingFields) -> StructuredOutputsParams | None:
        """response_format, or vLLM's structured_outputs / guided_* extras: one constraint."""
        given: list[tuple[str, dict[str, Any]]] = []
        response_format = request.response_format
        if response_format is not None and response_format.type == "json_schema":
            schema = response_format.json_schema.schema_ if response_format.json_schema else None
            if schema is None:
                raise RequestError(
                    "response_format of type json_schema needs json_schema.schema, e.g. "
                    '{"type": "json_schema", "json_schema": {"name": "answer", "schema": {...}}}.',
                    param="response_format",
                )
            given.append(("response_format", {"json": schema}))
        elif response_format is not None and response_format.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        if request.structured_outputs:
            given.append(("structured_outputs", dict(request.structured_outputs)))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            value = getattr(request, name)
            if value is not None:
                given.append((name, {key: value}))
        if not given:
            return None
        if len(given) > 1:
            raise RequestError(
                f"Give one output constraint, got {[name for name, _ in given]}: use response_format, "
                "structured_outputs or one guided_* field.",
                param=given[1][0],
            )
        name, spec = given[0]
        if request.guided_whitespace_pattern is not None:
            spec["whitespace_pattern"] = request.guided_whitespace_pattern
        try:
            return StructuredOutputsParams(**spec)
        except (ValueError, TypeError) as error:
            raise RequestError(f"Bad {name}: {error}", param=name) from None

    def process_input(self, prompt: dict[str, Any], params: SamplingParams) -> ProcessedPrompt:
        """Checks the prompt before any response starts, so a bad one is a 400 even when
        streaming."""
        try:
            return self.engine.process_input(prompt, params)
        except (ValueError, TypeError) as error:
            param = "response_format" if str(error).startswith("structured_outputs") else "prompt"
            raise RequestError(str(error), param=param) from None

    async def generate(self, prompt: ProcessedPrompt, params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        if self.options.request_logger is not None:
            self.options.request_logger.log_inputs(request_id, prompt.prompt, prompt.prompt_token_ids, params)
        try:
            async for output in self.engine.generate(prompt, params, request_id):
                yield output
        except ValueError as error:
            raise RequestError(str(error)) from None


def usage_of(outputs: list[RequestOutput], count_completion_tokens: bool = True) -> UsageInfo:
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    completion_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs) if count_completion_tokens else 0
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def top_entries(completion: CompletionOutput, start: int, end: int, num_top: int) -> list[tuple[int, Any, list[tuple[int, Any]]]]:
    """(token id, its Logprob, the num_top most likely (id, Logprob)) at positions [start, end)."""
    rows = []
    logprobs = completion.logprobs or []
    for position in range(start, min(end, len(logprobs), len(completion.token_ids))):
        entry = logprobs[position]
        token_id = completion.token_ids[position]
        ranked = sorted(entry.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
        rows.append((token_id, entry[token_id], ranked[:num_top]))
    return rows


def token_text(token_id: int, logprob: Any, as_token_id: bool = False) -> str:
    if as_token_id or logprob.decoded_token is None:
        return f"token_id:{token_id}"
    return logprob.decoded_token


def prompt_logprobs_of(output: RequestOutput) -> list[dict[str, PromptLogprob] | None] | None:
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
