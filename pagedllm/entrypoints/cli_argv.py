"""The `pagedllm` command line as vLLM's parser takes it, rewritten before argparse reads it:
`--config FILE.yaml` (the file's options in front of the command line's) and option names with
underscores (`--max_model_len`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence


def with_config_file(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """vLLM's `--config FILE.yaml`: the file's options (long names as keys) go in front of the
    command line's, right after the subcommand, so that a flag given on the command line wins
    over the file, and the file over the defaults. `true` is the bare flag, `false` its `--no-`
    form where the flag has one (else nothing), a list several values, a dict JSON."""
    subcommands: dict[str, argparse.ArgumentParser] = next(
        action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for index, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            break
    else:
        return argv
    if arg == "--config":
        if index + 1 >= len(argv):
            raise ValueError("--config needs a YAML file, e.g. --config config.yaml.")
        path, rest = argv[index + 1], argv[:index] + argv[index + 2:]
    else:
        path, rest = arg.split("=", 1)[1], argv[:index] + argv[index + 1:]
    import yaml

    with open(path, encoding="utf-8") as file:
        options = yaml.safe_load(file) or {}
    if not isinstance(options, dict):
        raise ValueError(f"--config {path}: the file must map option names to values, e.g. 'port: 8000'.")
    command = next((a for a in rest if a in subcommands), None)
    known = subcommands[command]._option_string_actions if command is not None else {}
    from_file: list[str] = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if isinstance(value, bool):
            if value or "--no-" + flag[2:] in known:
                from_file.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            from_file += [flag, *map(str, value)]
        elif isinstance(value, dict):
            from_file += [flag, json.dumps(value)]
        elif value is not None:
            from_file += [flag, str(value)]
    after = next((i + 1 for i, a in enumerate(rest) if a in subcommands), 0)
    return rest[:after] + from_file + rest[after:]


def dashed_options(argv: Sequence[str]) -> list[str]:
    """vLLM's parser takes `--max_model_len` for `--max-model-len`: underscores in an option's
    name (before any `=value`) become dashes."""
    dashed = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        dashed.append(arg)
    return dashed
