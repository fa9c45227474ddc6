"""The `pagedllm` command: `pagedllm generate --model M --prompt "..." [--max-tokens N ...]`,
and `pagedllm save-sharded --model M --tensor-parallel-size N --output DIR` (each rank's
shards written to their own files, for load_format="sharded_state").

Engine options are spelled like LLM's keyword arguments with dashes (`--max-model-len`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from pagedllm.engine.arg_utils import EngineArgs

def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description="pagedllm: LLM inference with a paged KV cache.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="complete prompts and print the completions")
    generate.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--n", type=int, default=1)
    generate.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                          help="apply the chat template (auto: when the tokenizer has one)")
    EngineArgs.add_cli_args(generate)
    _add_save_sharded_parser(commands)
    from pagedllm.entrypoints.openai.cli_args import add_serve_parser

    add_serve_parser(commands)
    return parser


def _add_save_sharded_parser(commands: Any) -> None:
    save = commands.add_parser(
        "save-sharded",
        help="save each tensor-parallel rank's weights to its own files (load_format='sharded_state')",
    )
    save.add_argument("--model", required=True, help="model folder or hub id")
    save.add_argument("--tensor-parallel-size", type=int, required=True, help="number of ranks to split into")
    save.add_argument("--output", required=True, help="folder to write (new or empty)")
    save.add_argument("--max-file-size", type=int, default=None,
                      help="largest file in bytes (default 5 GiB); a rank's state is split into parts")
    save.add_argument("--dtype", type=str, default=None, help="auto | float32 | bfloat16 | float16")
    save.add_argument("--load-format", type=str, default=None, help="auto | safetensors | pt")
    save.add_argument("--distributed-executor-backend", type=str, default=None, help="mp (default) | ray | uni")
    save.add_argument("--revision", type=str, default=None, help="hub revision of the model")
    save.add_argument("--download-dir", type=str, default=None, help="hub cache folder")
    save.add_argument("--device", type=str, default=None, help="auto | cuda | cpu")
    save.add_argument("--trust-remote-code", action="store_true", default=None)


def run_generate(args: argparse.Namespace) -> int:
    from pagedllm import LLM, SamplingParams
    from pagedllm.model_loader.default_model import DEFAULT_MODEL_NAME

    if args.model is None:
        print(f"Using the embedded default model {DEFAULT_MODEL_NAME}.", file=sys.stderr)
    llm = LLM(**dataclasses.asdict(EngineArgs.from_cli_args(args)))
    prompts = args.prompt or ["What is the capital of France?"]
    params = SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens
    )
    tokenizer = llm.get_tokenizer()
    has_template = tokenizer is not None and getattr(tokenizer, "chat_template", None) is not None
    use_chat = args.chat == "on" or (args.chat == "auto" and has_template)
    if use_chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        print(f"Prompt: {prompt!r}")
        for completion in output.outputs:
            print(f"Completion: {completion.text!r} ({completion.finish_reason})")
    llm.shutdown()
    return 0


def run_save_sharded(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.save_sharded import save_sharded_checkpoint

    names = ("dtype", "load_format", "distributed_executor_backend", "revision", "download_dir", "device", "trust_remote_code")
    kwargs = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    save_sharded_checkpoint(args.model, args.output, args.tensor_parallel_size, args.max_file_size, **kwargs)
    print(f"Saved {args.tensor_parallel_size} rank(s) of {args.model} to {args.output}; load it with "
          f"LLM(model={args.output!r}, load_format='sharded_state', tensor_parallel_size={args.tensor_parallel_size}).")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "generate":
        return run_generate(args)
    if args.command == "save-sharded":
        return run_save_sharded(args)
    if args.command == "serve":
        return args.dispatch(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
