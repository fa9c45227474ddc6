"""`pagedllm save-sharded`: load a model split over N ranks and write each rank's shards to
its own files (vLLM's `save_sharded_state` layout), for `load_format="sharded_state"`.

An entry point, not part of the loader: it builds a config and starts an executor, which the
loader (model_loader/sharded_state.py, a leaf) must not import."""

from __future__ import annotations

import glob
import logging
import os
from typing import Any

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.executor.base import Executor
from pagedllm.model_loader.sharded_state import (
    DEFAULT_FILE_PATTERN,
    copy_metadata_files,
    rank_file_glob,
)

logger = logging.getLogger(__name__)


def save_sharded_checkpoint(
    model: str, output_dir: str, tensor_parallel_size: int, max_file_size: int | None = None,
    file_pattern: str | None = None, **engine_kwargs: Any
) -> None:
    """Load `model` split over `tensor_parallel_size` ranks and save each rank's shards to
    `output_dir` (files named by `file_pattern`, vLLM's "model-rank-{rank}-part-{part}.safetensors"
    by default), with the source's config and tokenizer files, for
    `LLM(model=output_dir, load_format="sharded_state", tensor_parallel_size=...)`.
    No KV cache is allocated: the workers only load and save."""
    pattern = file_pattern or DEFAULT_FILE_PATTERN
    if "{rank}" not in pattern or "{part}" not in pattern:
        raise ValueError(f"--file-pattern {pattern!r} must contain {{rank}} and {{part}}, e.g. {DEFAULT_FILE_PATTERN!r}.")
    engine_kwargs.setdefault("skip_tokenizer_init", True)
    engine_args = EngineArgs.from_kwargs(model, tensor_parallel_size=tensor_parallel_size, **engine_kwargs)
    config = engine_args.create_engine_config()
    if config.model_config.gguf_file is not None:
        raise ValueError(
            f"save-sharded reads a model folder (config.json and weights), got the GGUF file {model!r}."
        )
    output_dir = os.path.abspath(output_dir)
    if os.path.abspath(config.model_config.model_path) == output_dir:
        raise ValueError(f"--output {output_dir} is the model folder itself; choose another folder.")
    os.makedirs(output_dir, exist_ok=True)
    stale = glob.glob(os.path.join(glob.escape(output_dir), rank_file_glob("*", pattern)))
    if stale:
        # Overwritten as vLLM's save overwrites; removed first, so that no part of an older
        # save (which may have had more parts or ranks) is left to mix with this one.
        logger.warning("%s holds %d file(s) of an earlier sharded state; they are replaced.", output_dir, len(stale))
        for path in stale:
            os.remove(path)
    executor = Executor.create(config)
    try:
        executor.collective_rpc("init_device")
        executor.collective_rpc("load_model")
        executor.save_sharded_state(output_dir, pattern=pattern, max_size=max_file_size)
    finally:
        executor.shutdown()
    copied = copy_metadata_files(config.model_config.model_path, output_dir)
    logger.info("Saved the sharded state of %s (%d ranks) to %s; copied %s.", model, tensor_parallel_size, output_dir, ", ".join(copied) or "nothing")


if __name__ == "__main__":
    # `python -m pagedllm.entrypoints.save_sharded --model M --output D ...`, like vLLM's
    # save_sharded_state.py example: the `pagedllm save-sharded` command.
    import sys

    from pagedllm.entrypoints.cli import main

    sys.exit(main(["save-sharded", *sys.argv[1:]]))
