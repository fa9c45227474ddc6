"""vLLM's `vllm.utils` names that scripts ported from vLLM import (its save_sharded_state.py
example builds its command line with FlexibleArgumentParser)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pagedllm.entrypoints.cli_argv import dashed_options

__all__ = ["FlexibleArgumentParser"]


class FlexibleArgumentParser(argparse.ArgumentParser):
    """argparse with vLLM's leniency: option names with underscores (`--max_model_len`) are
    read as the dashed ones."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        return super().parse_args(dashed_options(sys.argv[1:] if args is None else list(args)), namespace)
