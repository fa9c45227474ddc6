"""pagedllm.utils: vLLM's FlexibleArgumentParser, as its save_sharded_state.py example uses it."""

from __future__ import annotations

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.utils import FlexibleArgumentParser


def test_flexible_argument_parser_reads_engine_flags_with_underscores():
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    engine_args = EngineArgs.from_cli_args(parser.parse_args(["--model", "m", "--max_model_len", "64", "-tp", "2"]))
    assert (engine_args.model, engine_args.max_model_len, engine_args.tensor_parallel_size) == ("m", 64, 2)
