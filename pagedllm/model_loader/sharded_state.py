"""Sharded checkpoints: each tensor-parallel rank's parameters saved as its own safetensors
files, so loading them reads exactly the bytes a rank holds and slices nothing.

Layout of a folder (vLLM's save_sharded_state layout):
  model-rank-{rank}-part-{part}.safetensors   rank's parameters by name, files <= max size
  sharded_state.json                          {"tensor_parallel_size": N, ...}
  config.json, tokenizer files, ...           copied from the source model
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pagedllm.model_loader.weight_utils import ReadStats

logger = logging.getLogger(__name__)

DEFAULT_FILE_PATTERN = "model-rank-{rank}-part-{part}.safetensors"
METADATA_FILE = "sharded_state.json"
# The version of the saved tensors' layouts: 2 since 4-bit weight-only words are interleaved by
# half-word (layers/quantization/kernels/int_group.py). A quantization method whose layout
# changed names the version it needs (`min_sharded_layout_version`).
LAYOUT_VERSION = 2
# vLLM's default part size: large enough that parts are few, small enough for any filesystem.
DEFAULT_MAX_FILE_SIZE = 5 << 30
# Files of the source folder that are weights (never copied next to a sharded state).
_WEIGHT_FILE_PATTERNS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.safetensors.index.json",
    "*.bin.index.json", "*.msgpack", "*.h5",
)


def rank_file_glob(rank: int | str, pattern: str = DEFAULT_FILE_PATTERN) -> str:
    """The files of one rank ("*": of every rank) under `pattern`."""
    return pattern.format(rank=rank, part="*")


def saved_ranks(folder: str, pattern: str = DEFAULT_FILE_PATTERN) -> set[int]:
    """The ranks whose files under `pattern` the folder holds."""
    regex = re.compile(re.escape(pattern).replace(r"\{rank\}", r"(?P<rank>\d+)").replace(r"\{part\}", r"\d+"))
    return {int(match["rank"]) for name in os.listdir(folder) if (match := regex.fullmatch(name))}


def save_rank_state(
    model: torch.nn.Module,
    output_dir: str,
    rank: int,
    tensor_parallel_size: int,
    pattern: str | None = None,
    max_file_size: int | None = None,
    quantization: str | None = None,
) -> list[str]:
    """Write this rank's parameters (its shards, tied parameters once) into parts of at most
    `max_file_size` bytes (a single tensor larger than that gets a part of its own). Rank 0
    also writes sharded_state.json, which records `quantization` (the method the tensors are
    quantized with, which loading must use too). Returns the paths written."""
    pattern = pattern or DEFAULT_FILE_PATTERN
    max_file_size = DEFAULT_MAX_FILE_SIZE if max_file_size is None else max_file_size
    if max_file_size < 1:
        raise ValueError(f"max_file_size must be a positive number of bytes, got {max_file_size}.")
    os.makedirs(output_dir, exist_ok=True)
    # An earlier save's parts of this rank would be read along with these.
    for stale in glob.glob(os.path.join(glob.escape(output_dir), rank_file_glob(rank, pattern))):
        os.remove(stale)
    paths = []
    for part, tensors in enumerate(_parts(model, max_file_size)):
        path = os.path.join(output_dir, pattern.format(rank=rank, part=part))
        save_file(tensors, path)
        paths.append(path)
    if rank == 0:
        metadata = {"format": "pagedllm-sharded-state", "tensor_parallel_size": tensor_parallel_size,
                    "file_pattern": pattern, "layout_version": LAYOUT_VERSION, "quantization": quantization}
        with open(os.path.join(output_dir, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2)
    logger.info("Rank %d saved %d file(s) to %s.", rank, len(paths), output_dir)
    return paths


def _parts(model: torch.nn.Module, max_file_size: int) -> Iterator[dict[str, torch.Tensor]]:
    part: dict[str, torch.Tensor] = {}
    part_bytes = 0
    # named_parameters() yields a tied parameter once, under its first name. Persistent
    # buffers (an fp8 KV cache's scales) are state too.
    for name, param in [*model.named_parameters(), *_persistent_buffers(model).items()]:
        tensor = param.detach().cpu().contiguous()
        size = tensor.numel() * tensor.element_size()
        if part and part_bytes + size > max_file_size:
            yield part
            part, part_bytes = {}, 0
        part[name] = tensor
        part_bytes += size
    if part:
        yield part


def _read_metadata(folder: str) -> dict | None:
    """The fields of a sharded-state folder's METADATA_FILE (None when it has none)."""
    path = os.path.join(folder, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read {path} ({error}); save the sharded state again.") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"Cannot read {path} (not a JSON object); save the sharded state again.")
    return metadata


def read_saved_tensor_parallel_size(folder: str) -> int | None:
    """The tensor_parallel_size recorded in a sharded-state folder (None if it has no record)."""
    metadata = _read_metadata(folder)
    if metadata is None:
        return None
    try:
        return int(metadata["tensor_parallel_size"])
    except (ValueError, KeyError, TypeError) as error:
        path = os.path.join(folder, METADATA_FILE)
        raise ValueError(f"Cannot read {path} ({error}); save the sharded state again.") from None


def check_sharded_state_folder(folder: str, tensor_parallel_size: int, quantization: str | None,
                               pattern: str | None = None) -> None:
    """Start-up check for load_format='sharded_state': the folder holds a state saved with this
    tensor_parallel_size and this quantization method (when its sharded_state.json says).
    `pattern`: the files' names (model_loader_extra_config's), else the saved or default one."""
    metadata = _read_metadata(folder) or {}
    if "quantization" in metadata and metadata["quantization"] != quantization:
        saved_method = metadata["quantization"]
        raise ValueError(
            f"The sharded state in {folder} holds weights quantized with quantization={saved_method!r} but it "
            f"is loaded with quantization={quantization!r}; pass quantization={saved_method!r}."
        )
    saved = read_saved_tensor_parallel_size(folder)
    if saved is None:
        # Folders written by vLLM's example carry no metadata: count the ranks' files instead.
        pattern = pattern or DEFAULT_FILE_PATTERN
        ranks = saved_ranks(folder, pattern)
        if not ranks:
            raise ValueError(
                f"load_format='sharded_state' but {folder} holds no {rank_file_glob('*', pattern)} files; write "
                "them with `pagedllm save-sharded`, name their pattern with model_loader_extra_config="
                "{'pattern': ...}, or use load_format='auto'."
            )
        saved = max(ranks) + 1
    if saved != tensor_parallel_size:
        raise ValueError(
            f"The sharded state in {folder} was saved with tensor_parallel_size={saved} but "
            f"loading with tensor_parallel_size={tensor_parallel_size}; pass "
            f"tensor_parallel_size={saved}, or save it again with --tensor-parallel-size "
            f"{tensor_parallel_size}."
        )


@torch.no_grad()
def load_rank_state(model: torch.nn.Module, folder: str, rank: int, stats: ReadStats, pattern: str | None = None) -> None:
    """Copy this rank's saved tensors straight into the parameters of the same names (no
    slicing: they are already this rank's shards). Every parameter must be filled and every
    saved tensor used."""
    _check_layout_version(model, folder)
    pattern = pattern or _saved_pattern(folder)
    files = sorted(glob.glob(os.path.join(glob.escape(folder), rank_file_glob(rank, pattern))))
    if not files:
        raise ValueError(
            f"{folder} has no files for rank {rank} ({rank_file_glob(rank, pattern)}); the sharded "
            "state is incomplete: save it again with `pagedllm save-sharded`."
        )
    # Every name of a tied parameter: vLLM saves a tied embedding under lm_head.weight.
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = _persistent_buffers(model)
    filled: dict[int, str] = {}
    """id of each tensor filled -> the saved name it came from."""
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                param = params.get(name, buffers.get(name))
                if param is not None and id(param) in filled:
                    raise ValueError(
                        f"{path} holds {name!r}, which {filled[id(param)]!r} of another file already filled: "
                        "the folder mixes two saved states; save it again into an empty folder."
                    )
                if param is None:
                    raise ValueError(
                        f"{path} holds {name!r}, which is no parameter of {type(model).__name__}; "
                        "the sharded state was saved from another model or configuration."
                    )
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(
                        f"{path}: {name} has shape {tuple(tensor.shape)} but this rank's parameter "
                        f"has {tuple(param.shape)}; save the sharded state again for this model."
                    )
                param.data.copy_(tensor)
                stats.num_tensors += 1
                stats.bytes_read += tensor.numel() * tensor.element_size()
                filled[id(param)] = name
    missing = sorted(name for name, param in model.named_parameters() if id(param) not in filled)
    if missing:
        raise ValueError(
            f"The sharded state in {folder} lacks {len(missing)} parameter(s) of rank {rank}: "
            f"{', '.join(missing[:10])}; save it again with `pagedllm save-sharded`."
        )


def _check_layout_version(model: torch.nn.Module, folder: str) -> None:
    """A state saved before a layout this model's layers use changed would load without error
    and compute garbage: refuse it."""
    needed = max((getattr(getattr(module, "quant_method", None), "min_sharded_layout_version", 1)
                  for module in model.modules()), default=1)
    saved = int((_read_metadata(folder) or {}).get("layout_version", 1))
    if saved < needed:
        raise ValueError(
            f"The sharded state in {folder} was saved with layout version {saved}, but this model's "
            f"quantized layers need version {needed} or later; save it again with `pagedllm save-sharded`."
        )


def _persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that are state, not recomputed caches (they are in the state_dict)."""
    state_names = set(model.state_dict(keep_vars=True))
    return {name: buffer for name, buffer in model.named_buffers() if name in state_names}


def _saved_pattern(folder: str) -> str:
    pattern = (_read_metadata(folder) or {}).get("file_pattern")
    return pattern if isinstance(pattern, str) else DEFAULT_FILE_PATTERN


def copy_metadata_files(source_dir: str, output_dir: str) -> list[str]:
    """Copy everything of the source model folder that is not weights (config.json, tokenizer
    and generation files, chat templates, custom code) into `output_dir`; returns the names."""
    copied = []
    for name in sorted(os.listdir(source_dir)):
        skip = name == METADATA_FILE or name.startswith(".")
        if skip or any(fnmatch.fnmatch(name, pattern) for pattern in _WEIGHT_FILE_PATTERNS):
            continue
        source = os.path.join(source_dir, name)
        target = os.path.join(output_dir, name)
        if os.path.isdir(source):
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
        copied.append(name)
    return copied
