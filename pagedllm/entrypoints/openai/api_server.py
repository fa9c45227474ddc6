"""The FastAPI app of `pagedllm serve`: /health, /v1/models, /v1/completions,
/v1/chat/completions, /tokenize, /detokenize, /metrics; errors in OpenAI's shape; optional
bearer-key auth; CORS."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

import pagedllm
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.core_client import EngineDeadError
from pagedllm.entrypoints.openai.metrics import PrometheusStatLogger
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_engine import RequestError, ServingOptions, error_response
from pagedllm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CorsOptions:
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False


def build_app(
    engine: AsyncLLM,
    served_model_names: list[str],
    metrics: PrometheusStatLogger,
    api_key: str | None = None,
    chat_template: str | None = None,
    options: ServingOptions | None = None,
    disable_fastapi_docs: bool = False,
    root_path: str = "",
    cors: CorsOptions | None = None,
) -> FastAPI:
    """`root_path`: the prefix a proxy strips (--root-path); routes answer with and without it.
    `cors`: vLLM's --allowed-origins / --allowed-methods / --allowed-headers / --allow-credentials
    (every origin by default, as in vLLM)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()

    docs: dict[str, Any] = {"openapi_url": None, "docs_url": None, "redoc_url": None} if disable_fastapi_docs else {}
    app = FastAPI(title="pagedllm", version=pagedllm.__version__, lifespan=lifespan, root_path=root_path, **docs)
    completions = OpenAIServingCompletion(engine, served_model_names, options)
    chat = OpenAIServingChat(engine, served_model_names, chat_template, options)
    tokenization = OpenAIServingTokenization(chat)

    if api_key:
        app.add_middleware(_BearerKeyMiddleware, expected=f"Bearer {api_key}".encode())
    cors = cors or CorsOptions()
    # Added last, so it runs first: a browser's preflight never needs the key.
    app.add_middleware(CORSMiddleware, allow_origins=list(cors.allowed_origins), allow_methods=list(cors.allowed_methods),
                       allow_headers=list(cors.allowed_headers), allow_credentials=cors.allow_credentials)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, error: RequestError) -> JSONResponse:
        return error_response(str(error), error.status, error.param)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')} (got {e.get('input')!r})"
            for e in error.errors()
        )
        return error_response(f"Invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(str(error.detail), HTTPStatus(error.status_code))

    @app.exception_handler(EngineDeadError)
    async def on_engine_dead(request: Request, error: EngineDeadError) -> JSONResponse:
        return error_response(f"EngineDeadError: {error}", HTTPStatus.INTERNAL_SERVER_ERROR)

    @app.get("/health")
    async def health() -> Response:
        try:
            await engine.check_health()
        except EngineDeadError as error:
            return error_response(f"EngineDeadError: {error}", HTTPStatus.SERVICE_UNAVAILABLE)
        return Response(status_code=200)

    @app.get("/ping")
    async def ping() -> Response:
        return await health()

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": pagedllm.__version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        root = engine.model_config.model
        max_model_len = engine.model_config.max_model_len
        return ModelList(data=[ModelCard(id=name, root=root, max_model_len=max_model_len) for name in served_model_names])

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        return tokenization.tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        return tokenization.detokenize(request)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Any:
        await engine.check_health()
        return await completions.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Any:
        await engine.check_health()
        return await chat.create_chat_completion(request, raw_request)

    return app


class _BearerKeyMiddleware:
    """Refuses /v1/* without `Authorization: Bearer KEY` (plain ASGI: streaming and client
    disconnects pass through untouched). /health and /metrics stay open, as in vLLM."""

    def __init__(self, app: ASGIApp, expected: bytes) -> None:
        self.app = app
        self.expected = expected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and _route_path(scope).startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(
                    "Unauthorized: send the server's API key as 'Authorization: Bearer KEY'.", HTTPStatus.UNAUTHORIZED
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the router matches: without the --root-path prefix, which Starlette strips."""
    path, root_path = scope["path"], scope.get("root_path", "")
    if root_path and (path == root_path or path.startswith(root_path + "/")):
        return path[len(root_path):]
    return path


def main() -> int:
    """`python -m pagedllm.entrypoints.openai.api_server --model M ...`, as with vLLM; the same
    as `pagedllm serve`."""
    import argparse

    from pagedllm.entrypoints.openai.cli_args import add_serve_arguments, run_serve

    parser = argparse.ArgumentParser(prog="python -m pagedllm.entrypoints.openai.api_server")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
