"""`pagedllm serve [MODEL] [--host] [--port] [--api-key] [--served-model-name]
[--chat-template] [vLLM's server flags] [engine options]`: the parser and the runner of the
subcommand."""

from __future__ import annotations

import argparse
import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from pagedllm import envs
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.entrypoints.chat_utils import load_chat_template

if TYPE_CHECKING:
    from pagedllm.entrypoints.openai.api_server import CorsOptions
    from pagedllm.entrypoints.openai.serving_engine import ServingOptions

logger = logging.getLogger(__name__)


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    serve = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/models, /health, /metrics).",
    )
    add_serve_arguments(serve)
    serve.set_defaults(dispatch=run_serve)
    return serve


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="model folder, .gguf file or hub id (same as --model; default: the embedded model)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $PAGEDLLM_API_KEY or $VLLM_API_KEY)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="name(s) clients use in 'model' (default: the model argument)")
    parser.add_argument("--chat-template", default=None,
                        help="a Jinja chat template, or a file holding one (default: the tokenizer's)")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=("critical", "error", "warning", "info", "debug", "trace"))
    parser.add_argument("--disable-uvicorn-access-log", action="store_true", help="no log line per HTTP request")
    parser.add_argument("--enable-log-requests", action="store_true",
                        help="log each request's id, prompt and sampling parameters at INFO")
    parser.add_argument("--disable-log-requests", action="store_true",
                        help="vLLM's older flag: turns --enable-log-requests off (requests are not logged by default)")
    parser.add_argument("--max-log-len", type=int, default=None,
                        help="characters of the prompt and prompt token ids a logged request shows (default: all)")
    parser.add_argument("--disable-frontend-multiprocessing", action="store_true",
                        help="accepted for vLLM compatibility: the engine core always runs in its own process")
    parser.add_argument("--disable-fastapi-docs", action="store_true", help="no /docs, /redoc or /openapi.json")
    parser.add_argument("--root-path", default="", help="the path prefix a reverse proxy strips (FastAPI's root_path)")
    parser.add_argument("--response-role", default="assistant", help="the role of chat answers (default assistant)")
    parser.add_argument("--enable-prompt-tokens-details", action="store_true",
                        help="usage.prompt_tokens_details.cached_tokens: prompt tokens served from the prefix cache")
    parser.add_argument("--return-tokens-as-token-ids", action="store_true",
                        help='logprob tokens as "token_id:{id}" (a request\'s return_tokens_as_token_ids overrides it)')
    parser.add_argument("--chat-template-content-format", default="auto", choices=("auto", "string", "openai"),
                        help="message content as one string or as OpenAI's list of parts (auto: what the template reads)")
    parser.add_argument("--allowed-origins", type=_json_list, default=["*"],
                        help='CORS origins, a JSON list (default ["*"])')
    parser.add_argument("--allowed-methods", type=_json_list, default=["*"],
                        help='CORS methods, a JSON list (default ["*"])')
    parser.add_argument("--allowed-headers", type=_json_list, default=["*"],
                        help='CORS headers, a JSON list (default ["*"])')
    parser.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    EngineArgs.add_cli_args(parser)


def _json_list(value: str) -> list[str]:
    """vLLM's form of the CORS flags: a JSON list of strings, e.g. '["https://a.example"]'."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
        raise argparse.ArgumentTypeError(f'expected a JSON list of strings, e.g. \'["*"]\', got {value!r}')
    return parsed


def cors_options(args: argparse.Namespace) -> CorsOptions:
    from pagedllm.entrypoints.openai.api_server import CorsOptions

    return CorsOptions(tuple(args.allowed_origins), tuple(args.allowed_methods), tuple(args.allowed_headers),
                       args.allow_credentials)


def serving_options(args: argparse.Namespace) -> ServingOptions:
    """The endpoints' options from the parsed `serve` flags."""
    from pagedllm.entrypoints.openai.request_logger import RequestLogger
    from pagedllm.entrypoints.openai.serving_engine import ServingOptions

    request_logger = None
    if args.enable_log_requests and not args.disable_log_requests:
        request_logger = RequestLogger(args.max_log_len)
    return ServingOptions(
        response_role=args.response_role,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        chat_template_content_format=args.chat_template_content_format,
        request_logger=request_logger,
    )


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    class _Server(uvicorn.Server):
        """Stops the engine as soon as SIGINT / SIGTERM arrives, so open streams end at once
        (with an error event) instead of holding the graceful shutdown."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once it has shut down, which kills the process
            # (SIGTERM) or raises KeyboardInterrupt (SIGINT); the shutdown is clean, so exit
            # with status 0 instead.
            getattr(self, "_captured_signals", []).clear()
            # From a thread: AsyncLLM.shutdown fails the open streams on the event loop, then
            # joins the engine-core process, which on the loop would hold back the streams'
            # last events (on a loaded machine past the graceful timeout, which then cancels
            # them with a traceback). The process waits for this thread before it exits.
            threading.Thread(target=engine.shutdown, name="pagedllm-engine-shutdown").start()

    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.entrypoints.openai.api_server import build_app
    from pagedllm.entrypoints.openai.metrics import PrometheusStatLogger

    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise ValueError(f"Two models given: {args.model_tag!r} and --model {args.model!r}; give one.")
    if args.model_tag is not None:
        args.model = args.model_tag
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}.")
    chat_template = load_chat_template(args.chat_template)
    options = serving_options(args)
    engine_args = EngineArgs.from_cli_args(args)
    if engine_args.model is None:
        from pagedllm.model_loader.default_model import DEFAULT_MODEL_NAME

        logger.info("No model given: serving the embedded default model %s.", DEFAULT_MODEL_NAME)
        served_model_names = args.served_model_name or [DEFAULT_MODEL_NAME.split(" ")[0]]
    else:
        served_model_names = args.served_model_name or [engine_args.model]
    metrics = PrometheusStatLogger(served_model_names[0])
    engine = AsyncLLM.from_engine_args(engine_args, stat_loggers=[metrics])
    try:
        app = build_app(engine, served_model_names, metrics, args.api_key or envs.api_key(), chat_template, options,
                        disable_fastapi_docs=args.disable_fastapi_docs, root_path=args.root_path,
                        cors=cors_options(args))
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            # Open streams get this long to finish at shutdown (SIGTERM / Ctrl-C).
            timeout_graceful_shutdown=5,
        )
        logger.info("Serving %s at http://%s:%d (OpenAI API under /v1).", served_model_names[0], args.host, args.port)
        _Server(config).run()
    finally:
        engine.shutdown()
    return 0
