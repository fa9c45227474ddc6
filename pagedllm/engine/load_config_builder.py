"""The loading section of the engine config: load_format against the model found (a GGUF file
or a folder), cpu_offload_gb, vLLM's model_loader_extra_config, and the sharded-state checks
(a folder of rank files loaded with the right format, tensor_parallel_size and quantization)."""

from __future__ import annotations

import os
from typing import Any

import torch

from pagedllm.config import LoadConfig


def build_load_config(model: str, resolved: Any, args: dict[str, Any], device: torch.device) -> LoadConfig:
    """`resolved`: discovery's ResolvedModel of `model` (its folder, or its GGUF file)."""
    load_format = args["load_format"]
    if resolved.gguf_file is not None and load_format not in ("auto", "gguf"):
        raise ValueError(f"model={model!r} is a GGUF file: use load_format='auto' or 'gguf', not {load_format!r}.")
    if resolved.gguf_file is None and load_format == "gguf":
        raise ValueError(f"load_format='gguf' needs model= to be a .gguf file, got {model!r}.")
    cpu_offload_gb = args["cpu_offload_gb"]
    if isinstance(cpu_offload_gb, bool) or not isinstance(cpu_offload_gb, (int, float)) or cpu_offload_gb < 0:
        raise ValueError(f"cpu_offload_gb must be a number of GiB >= 0, got {cpu_offload_gb!r}.")
    if cpu_offload_gb > 0 and device.type != "cuda":
        raise ValueError(
            f"cpu_offload_gb={cpu_offload_gb} offloads weights from a GPU to host memory, but the "
            f"device is {device}; use cpu_offload_gb=0 on CPU."
        )
    return LoadConfig(
        load_format="gguf" if resolved.gguf_file else load_format,
        download_dir=args["download_dir"],
        cpu_offload_bytes=int(cpu_offload_gb * (1 << 30)),
        sharded_state_pattern=_sharded_state_pattern(args["model_loader_extra_config"], load_format),
    )


def check_sharded_state(load_config: LoadConfig, model_path: str, tensor_parallel_size: int,
                        quantization: str | None) -> None:
    """A folder of rank files loads only with load_format='sharded_state', and then only with the
    tensor_parallel_size and quantization it was saved with."""
    if load_config.load_format in ("auto", "safetensors"):
        from pagedllm.model_loader.sharded_state import METADATA_FILE, saved_ranks

        if os.path.isfile(os.path.join(model_path, METADATA_FILE)) or saved_ranks(model_path):
            # Its files hold each rank's shards, which a whole-checkpoint load would misread.
            raise ValueError(
                f"{model_path} holds a sharded state (each rank's files, written by save-sharded or "
                "vLLM's save_sharded_state); load it with load_format='sharded_state'."
            )
    if load_config.load_format == "sharded_state":
        from pagedllm.model_loader.sharded_state import check_sharded_state_folder

        check_sharded_state_folder(model_path, tensor_parallel_size, quantization,
                                   load_config.sharded_state_pattern)


def _sharded_state_pattern(extra_config: Any, load_format: str) -> str | None:
    """vLLM's model_loader_extra_config: the sharded-state loader takes {"pattern": ...}; any
    other key, or a pattern for another loader, is a ValueError (as vLLM's loader raises)."""
    if extra_config is None:
        return None
    if not isinstance(extra_config, dict):
        raise ValueError(f"model_loader_extra_config must be a dict like {{'pattern': ...}}, got {extra_config!r}.")
    unexpected = sorted(set(extra_config) - {"pattern"})
    if unexpected:
        raise ValueError(f"model_loader_extra_config has unexpected key(s) {unexpected}; the sharded-state "
                         "loader takes 'pattern' only.")
    pattern = extra_config.get("pattern")
    if pattern is None:
        return None
    if load_format != "sharded_state":
        raise ValueError(f"model_loader_extra_config={{'pattern': ...}} names a sharded state's files; pass "
                         f"load_format='sharded_state' (got {load_format!r}).")
    if not isinstance(pattern, str) or "{rank}" not in pattern or "{part}" not in pattern:
        raise ValueError(f"model_loader_extra_config['pattern'] must hold {{rank}} and {{part}}, "
                         f"e.g. 'model-rank-{{rank}}-part-{{part}}.safetensors', got {pattern!r}.")
    return pattern
