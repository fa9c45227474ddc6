"""The `serve` subcommand's parser, without starting a server."""

from __future__ import annotations

import argparse

import pytest

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.entrypoints.chat_utils import load_chat_template
from pagedllm.entrypoints.openai.cli_args import add_serve_parser


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_model_positional_or_flag_and_engine_options():
    args = _parse(["some/model", "--port", "9000", "--api-key", "k", "--served-model-name", "a", "b",
                   "--max-model-len", "128", "--no-enable-prefix-caching", "--dtype", "float32"])
    assert (args.model_tag, args.port, args.api_key, args.served_model_name) == ("some/model", 9000, "k", ["a", "b"])
    engine_args = EngineArgs.from_cli_args(args)
    assert (engine_args.max_model_len, engine_args.enable_prefix_caching, engine_args.dtype) == (128, False, "float32")
    flag = _parse(["--model", "other"])
    assert flag.model_tag is None and flag.model == "other" and flag.port == 8000 and flag.host == "0.0.0.0"


def test_chat_template_is_a_file_or_the_text(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert load_chat_template(str(path)) == template == load_chat_template(template)
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        load_chat_template("missing.jinja")


def test_api_key_from_the_environment_pagedllm_name_wins(monkeypatch):
    from pagedllm import envs

    monkeypatch.delenv("PAGEDLLM_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert envs.api_key() == "from-vllm"
    monkeypatch.setenv("PAGEDLLM_API_KEY", "from-pagedllm")
    assert envs.api_key() == "from-pagedllm"


def test_vllm_serve_flags_parse():
    args = _parse(["m", "--enable-log-requests", "--disable-log-requests", "--max-log-len", "100",
                   "--disable-frontend-multiprocessing", "--disable-fastapi-docs", "--root-path", "/api",
                   "--response-role", "bot", "--enable-prompt-tokens-details", "--return-tokens-as-token-ids",
                   "--chat-template-content-format", "openai"])
    assert (args.enable_log_requests, args.disable_log_requests, args.max_log_len) == (True, True, 100)
    assert (args.disable_fastapi_docs, args.root_path, args.response_role) == (True, "/api", "bot")
    assert args.enable_prompt_tokens_details and args.return_tokens_as_token_ids
    assert args.chat_template_content_format == "openai" and args.disable_frontend_multiprocessing
    defaults = _parse([])
    assert (defaults.enable_log_requests, defaults.max_log_len, defaults.root_path, defaults.response_role) == (
        False, None, "", "assistant")
    assert defaults.chat_template_content_format == "auto"
    with pytest.raises(SystemExit):
        _parse(["--chat-template-content-format", "xml"])


def test_serving_options_from_the_flags_log_requests_only_when_enabled():
    pytest.importorskip("fastapi")
    from pagedllm.entrypoints.openai.cli_args import serving_options

    options = serving_options(_parse(["--enable-log-requests", "--max-log-len", "5", "--response-role", "bot",
                                      "--return-tokens-as-token-ids"]))
    assert options.request_logger.max_log_len == 5 and options.response_role == "bot"
    assert options.return_tokens_as_token_ids and not options.enable_prompt_tokens_details
    assert serving_options(_parse([])).request_logger is None
    # vLLM's older --disable-log-requests wins.
    assert serving_options(_parse(["--enable-log-requests", "--disable-log-requests"])).request_logger is None
    with pytest.raises(ValueError, match="--max-log-len"):
        serving_options(_parse(["--enable-log-requests", "--max-log-len", "-1"]))
