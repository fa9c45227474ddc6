"""The `pagedllm` command, split like vLLM's:

- `pagedllm generate --prompt "..."`: completes raw text exactly as `LLM.generate` does;
- `pagedllm chat [--prompt "..."]`: applies the chat template (one message, or a conversation
  read line by line from stdin until EOF);
- `pagedllm plan --model M [--gpu-memory 80GiB]`: the memory plan, from config.json and the
  checkpoint's headers only (entrypoints/plan.py);
- `pagedllm save-sharded`: each tensor-parallel rank's weights to its own files;
- `pagedllm serve`, when the server package (entrypoints/openai/) is present.

Engine options are LLM's keyword arguments spelled with dashes (`--max-model-len`), generated
from `EngineArgs`; sampling options are SamplingParams' (`--max-tokens`, `--temperature`, ...)
and are checked before the model loads. A bad option or value prints one line,
`pagedllm: error: <message>`, and exits with status 2 (`--debug` shows the traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.entrypoints.cli_argv import dashed_options, with_config_file

Runner = Callable[[argparse.Namespace], int]
BAD_INPUT_STATUS = 2


class CliArgumentParser(argparse.ArgumentParser):
    """argparse's errors as one line, `pagedllm: error: <message>`, without the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(BAD_INPUT_STATUS, f"pagedllm: error: {message}\n")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """SamplingParams' options; one not given keeps SamplingParams' default, as LLM.generate."""
    group = parser.add_argument_group("sampling options (SamplingParams)")
    group.add_argument("--n", type=int, help="completions per prompt (default 1)")
    group.add_argument("--max-tokens", type=int, help="most tokens per completion (default 16)")
    group.add_argument("--min-tokens", type=int, help="fewest tokens before EOS or a stop string counts")
    group.add_argument("--temperature", type=float, help="0 is greedy (default 1.0)")
    group.add_argument("--top-p", type=float, help="nucleus probability mass in (0, 1]")
    group.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 or -1: all)")
    group.add_argument("--min-p", type=float, help="drop tokens below min_p times the top probability")
    group.add_argument("--seed", type=int, help="the request's sampling seed")
    group.add_argument("--presence-penalty", type=float)
    group.add_argument("--frequency-penalty", type=float)
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--stop", action="append", help="a stop string (repeat for several)")
    group.add_argument("--stop-token-ids", type=int, nargs="+", help="token ids that end a completion")
    group.add_argument("--ignore-eos", action="store_true", default=None, help="keep going after EOS")
    group.add_argument("--include-stop-str-in-output", action="store_true", default=None)
    group.add_argument("--skip-special-tokens", action=argparse.BooleanOptionalAction, default=None)


_SAMPLING_NAMES = (
    "n", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids",
    "ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
)


def sampling_params_from_args(args: argparse.Namespace, model_defaults: dict[str, Any] | None = None) -> Any:
    """SamplingParams of the options given over `model_defaults` (the model's
    generation_config.json fields, which LLM.generate uses when given no params); a bad value
    is SamplingParams' ValueError. Called once before the model loads (no defaults: the
    options alone are checked) and once after."""
    from pagedllm.engine.sampling_params import SamplingParams

    given = {name: getattr(args, name) for name in _SAMPLING_NAMES if getattr(args, name, None) is not None}
    return SamplingParams(**{**(model_defaults or {}), **given})


def _add_model_parser(commands: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    _add_debug_flag(parser)
    add_sampling_args(parser)
    # --seed is the request's sampling seed here, as in SamplingParams; the engine keeps its
    # default seed, so `pagedllm generate` samples exactly as LLM(model).generate does.
    EngineArgs.add_cli_args(parser, exclude=("seed",))
    return parser


def _add_generate_parser(commands: Any) -> Runner:
    parser = _add_model_parser(commands, "generate", "complete raw text (no chat template), as LLM.generate")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for several; default: one per stdin line)")
    return run_generate


def _add_chat_parser(commands: Any) -> Runner:
    parser = _add_model_parser(commands, "chat", "chat with the model through its chat template, as LLM.chat")
    parser.add_argument("--prompt", help="one user message (default: a conversation read from stdin until EOF)")
    parser.add_argument("--system-prompt", help="a system message in front of the conversation")
    parser.add_argument("--chat-template", default=None,
                        help="a Jinja chat template, or a file holding one (default: the tokenizer's)")
    return run_chat


def _add_save_sharded_parser(commands: Any) -> Runner:
    help_text = "save each tensor-parallel rank's weights to its own files (load_format='sharded_state')"
    save = commands.add_parser("save-sharded", help=help_text, description=help_text)
    _add_debug_flag(save)
    save.add_argument("--output", "-o", required=True, help="folder to write (the rank files of an earlier save there are replaced)")
    save.add_argument("--file-pattern", default=None,
                      help="file names, with {rank} and {part} (default model-rank-{rank}-part-{part}.safetensors)")
    save.add_argument("--max-file-size", type=int, default=None,
                      help="largest file in bytes (default 5 GiB); a rank's state is split into parts")
    # Every engine option, as vLLM's save_sharded_state takes them: --model and
    # --tensor-parallel-size, and what the saved state must keep (--quantization fp8, ...).
    EngineArgs.add_cli_args(save)
    return run_save_sharded


def _add_plan_parser(commands: Any) -> Runner:
    from pagedllm.entrypoints.plan import add_plan_parser, run_plan

    _add_debug_flag(add_plan_parser(commands))
    return run_plan


def _add_serve_parser(commands: Any) -> Runner | None:
    """`serve` comes from the server package when it is installed alongside."""
    try:
        server = importlib.import_module("pagedllm.entrypoints.openai.cli_args")
    except ModuleNotFoundError as error:
        if error.name is not None and error.name.startswith("pagedllm.entrypoints.openai"):
            return None
        raise
    parser = server.add_serve_parser(commands)
    if parser is not None:
        _add_debug_flag(parser)
    return server.run_serve


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    if "--debug" in parser._option_string_actions:
        return  # the subcommand declares its own
    # SUPPRESS: a subcommand that is not given --debug keeps the top-level value.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Runner]]:
    """The parser and each subcommand's runner."""
    import pagedllm

    parser = CliArgumentParser(prog="pagedllm", description="pagedllm: LLM inference with a paged KV cache.")
    parser.add_argument("--debug", action="store_true", default=False, help="show the traceback of an error")
    parser.add_argument("-v", "--version", action="version", version=pagedllm.__version__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CliArgumentParser)
    runners: dict[str, Runner] = {
        "generate": _add_generate_parser(commands),
        "chat": _add_chat_parser(commands),
        "plan": _add_plan_parser(commands),
        "save-sharded": _add_save_sharded_parser(commands),
    }
    run_serve = _add_serve_parser(commands)
    if run_serve is not None:
        runners["serve"] = run_serve
    return parser, runners


def _make_llm(args: argparse.Namespace) -> Any:
    from pagedllm import LLM
    from pagedllm.model_loader.default_model import DEFAULT_MODEL_NAME

    if args.model is None:
        print(f"Using the embedded default model {DEFAULT_MODEL_NAME}.", file=sys.stderr)
    return LLM(**dataclasses.asdict(EngineArgs.from_cli_args(args)))


def _read_lines() -> list[str]:
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


def _model_defaults(llm: Any) -> dict[str, Any]:
    return llm.llm_engine.frontend.sampling_overrides


def run_generate(args: argparse.Namespace) -> int:
    sampling_params_from_args(args)  # bad sampling options fail before the model loads
    prompts = args.prompt if args.prompt is not None else _read_lines()
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT, or prompts on stdin, one per line.")
    llm = _make_llm(args)
    try:
        # As LLM.generate(prompts) uses them: the model's generation_config defaults.
        params = sampling_params_from_args(args, _model_defaults(llm))
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.shutdown()
    many = len(outputs) > 1 or len(outputs[0].outputs) > 1
    for index, output in enumerate(outputs):
        for completion in output.outputs:
            if many:
                print(f"--- prompt {index}, completion {completion.index} ({completion.finish_reason})")
            print(completion.text)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.chat_utils import load_chat_template

    if (sampling_params_from_args(args).n or 1) > 1:
        raise ValueError("chat keeps one reply per turn: use --n 1 (generate prints every completion).")
    chat_template = load_chat_template(args.chat_template)
    llm = _make_llm(args)
    try:
        params = sampling_params_from_args(args, _model_defaults(llm))
        conversation: list[dict[str, str]] = []
        if args.system_prompt is not None:
            conversation.append({"role": "system", "content": args.system_prompt})
        messages = [args.prompt] if args.prompt is not None else _user_messages()
        for message in messages:
            conversation.append({"role": "user", "content": message})
            reply = llm.chat(conversation, params, use_tqdm=False, chat_template=chat_template)[0].outputs[0].text
            conversation.append({"role": "assistant", "content": reply})
            print(reply, flush=True)
    finally:
        llm.shutdown()
    return 0


def _user_messages() -> Any:
    """stdin's lines until EOF, with a `> ` prompt on a terminal."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def run_save_sharded(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.save_sharded import save_sharded_checkpoint

    options = EngineArgs.given_cli_options(args)
    model = options.pop("model", None)
    if model is None:
        raise ValueError("save-sharded needs --model: the model folder or hub id to split.")
    tensor_parallel_size = options.pop("tensor_parallel_size", 1)
    save_sharded_checkpoint(model, args.output, tensor_parallel_size, args.max_file_size, args.file_pattern, **options)
    kept = "".join(f", {name}={options[name]!r}" for name in ("quantization", "kv_cache_dtype") if name in options)
    print(f"Saved {tensor_parallel_size} rank(s) of {model} to {args.output}; load it with "
          f"LLM(model={args.output!r}, load_format='sharded_state', tensor_parallel_size={tensor_parallel_size}"
          f"{kept}).")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand. Bad input (ValueError, TypeError, a missing file) exits with
    status 2 and one line on stderr; any other failure with status 1, also in one line;
    `--debug` lets the exception (and its traceback) through."""
    parser, runners = build_parser()
    try:
        argv = with_config_file(list(sys.argv[1:] if argv is None else argv), parser)
    except (ValueError, OSError) as error:
        parser.exit(BAD_INPUT_STATUS, f"pagedllm: error: {_one_line(error)}\n")
    args = parser.parse_args(dashed_options(argv))
    try:
        return runners[args.command](args)
    except (ValueError, TypeError, OSError) as error:
        if args.debug:
            raise
        parser.exit(BAD_INPUT_STATUS, f"pagedllm: error: {_one_line(error)}\n")
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        if args.debug:
            raise
        parser.exit(1, f"pagedllm: error: {type(error).__name__}: {_one_line(error)} (--debug shows the traceback)\n")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
