"""Checkpoint files: which ones to read, and iterators over the tensors they hold.

The iterators yield `(checkpoint_name, tensor)` pairs in the checkpoint's own (Hugging Face)
names; the model's `load_weights` maps names onto parameters and each parameter's
`weight_loader` casts, copies and (under tensor parallelism) narrows to its rank's shard.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import pickle
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

WEIGHT_FORMATS = ("safetensors", "pt")
# Files of each format that may hold weights, and the index naming its shards.
_WEIGHT_GLOBS = {"safetensors": ("*.safetensors",), "pt": ("*.bin", "*.pt")}
_INDEX_FILES = {"safetensors": "model.safetensors.index.json", "pt": "pytorch_model.bin.index.json"}
# Pickles that trainers leave next to the weights: not weights, and not loadable with
# weights_only=True (they hold Python objects).
_NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")
# Mistral repos ship consolidated*.safetensors (their own naming) beside the HF shards.
_DUPLICATE_SAFETENSORS = "consolidated*.safetensors"


def index_file_name(weight_format: str) -> str:
    """The index file (shard map) of a format: model.safetensors.index.json or
    pytorch_model.bin.index.json."""
    return _INDEX_FILES[weight_format]


def _is_weight_file(name: str, weight_format: str) -> bool:
    if "/" in name:  # subfolders (original/, onnx/, ...) hold other layouts, never ours
        return False
    if any(fnmatch.fnmatch(name, pattern) for pattern in _NOT_WEIGHTS):
        return False
    return any(fnmatch.fnmatch(name, pattern) for pattern in _WEIGHT_GLOBS[weight_format])


def choose_weight_format(file_names: Collection[str], load_format: str, where: str) -> str:
    """"safetensors" or "pt": the format that `load_format` ("auto", "safetensors" or "pt")
    reads from a folder or repo holding `file_names`. Auto prefers safetensors (no pickle,
    memory-mapped). `where` names the folder or repo in the error."""
    if load_format not in ("auto", *WEIGHT_FORMATS):
        raise ValueError(
            f"load_format={load_format!r} does not read checkpoint files; use 'auto', "
            "'safetensors' or 'pt'."
        )
    candidates = WEIGHT_FORMATS if load_format == "auto" else (load_format,)
    for weight_format in candidates:
        if any(_is_weight_file(name, weight_format) for name in file_names):
            return weight_format
    present = sorted(file_names)
    shown = ", ".join(present[:20]) + (f", ... ({len(present) - 20} more)" if len(present) > 20 else "")
    others = [
        f for f in WEIGHT_FORMATS
        if f not in candidates and any(_is_weight_file(name, f) for name in file_names)
    ]
    if others:
        hint = f"Use load_format={others[0]!r}"
    elif any(name.endswith(".gguf") for name in file_names):
        hint = "Pass the .gguf file itself as model="
    else:
        hint = "Use load_format='dummy' for random weights, or pass a folder that has weights"
    wanted = "*.safetensors or *.bin" if load_format == "auto" else " or ".join(_WEIGHT_GLOBS[load_format])
    raise ValueError(
        f"No weight files for load_format={load_format!r} ({wanted}) in {where}; it holds: "
        f"{shown or 'nothing'}. {hint}."
    )


def select_weight_files(
    file_names: Collection[str], weight_format: str, indexed: Collection[str] | None
) -> list[str]:
    """The names to read, sorted: the shards an index names when there is one (so files the
    index leaves out, such as Mistral's consolidated.safetensors, are skipped), else every
    weight file of the format."""
    if indexed is not None:
        return sorted(set(indexed))
    names = sorted(name for name in file_names if _is_weight_file(name, weight_format))
    if weight_format == "safetensors":
        kept = [name for name in names if not fnmatch.fnmatch(name, _DUPLICATE_SAFETENSORS)]
        if kept:
            names = kept
    return names


def read_index(index_path: str) -> list[str]:
    """The shard files an index's weight_map names."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"Cannot read the shard index {index_path} ({error}); it must be JSON with a "
            "'weight_map'. Download the model again."
        ) from None
    return sorted(set(weight_map.values()))


def find_weight_files(model_path: str, load_format: str) -> tuple[list[str], str]:
    """Paths of the checkpoint files to read from `model_path`, and their format
    ("safetensors" or "pt"). An index file, when present, decides the shards."""
    if not os.path.isdir(model_path):
        raise ValueError(f"Model folder {model_path!r} does not exist; pass a model folder or hub id.")
    file_names = [name for name in os.listdir(model_path) if os.path.isfile(os.path.join(model_path, name))]
    weight_format = choose_weight_format(file_names, load_format, f"folder {model_path}")
    index_name = index_file_name(weight_format)
    indexed = read_index(os.path.join(model_path, index_name)) if index_name in file_names else None
    names = select_weight_files(file_names, weight_format, indexed)
    missing = [name for name in names if not os.path.isfile(os.path.join(model_path, name))]
    if missing:
        raise ValueError(
            f"{index_name} in {model_path} names {len(missing)} shard(s) that are not there "
            f"({', '.join(missing[:5])}); the download is incomplete: download the model again."
        )
    logger.debug("Weight files (%s) in %s: %s", weight_format, model_path, names)
    return [os.path.join(model_path, name) for name in names], weight_format


def _progress(files: list[str], description: str, use_tqdm: bool) -> Iterable[str]:
    # One file gives a bar that jumps from 0 to 1: show one only when there is progress to see.
    return tqdm(files, desc=description, unit="file", disable=not use_tqdm or len(files) < 2)


def safetensors_weights_iterator(
    files: list[str], use_tqdm: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the files, read whole onto the CPU (memory-mapped)."""
    for path in _progress(files, "Loading safetensors checkpoint shards", use_tqdm):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def safetensors_slices_iterator(files: list[str], use_tqdm: bool = True) -> Iterator[tuple[str, Any]]:
    """Every tensor of the files as a lazy safetensors slice: `sl[a:b]` or `sl[:, a:b]` reads
    only that part from disk, so a tensor-parallel rank reads its shard and nothing more
    (`sl.get_shape()` gives the full shape; `sl[:]` reads it all). A layer's weight_loader
    that narrows should index the slice rather than call torch.narrow on a full tensor.
    A slice is valid only until the iterator advances past its file: consume it at once."""
    for path in _progress(files, "Loading safetensors checkpoint shards", use_tqdm):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


@dataclass
class ReadStats:
    """What a loader read from checkpoint files (one per load, owned by the caller)."""

    bytes_read: int = 0
    """Bytes of tensor data materialised from the files (slices count only their part)."""
    num_tensors: int = 0
    """Checkpoint tensors seen."""


# safetensors dtype names -> torch dtypes (the ones torch has).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CountingSlice:
    """A safetensors slice that adds the bytes of every part read through it to `stats`.

    Slice-aware weight loaders index it (`sl[a:b]`, `narrow`) and read only their part. Any
    other use (a torch function, `copy_`, `.to(...)`, `.float()`, ...) reads the whole tensor
    once and acts on it, so a loader written for plain tensors still loads correctly, only
    without the saving."""

    __slots__ = ("_slice", "_stats", "_full")

    def __init__(self, sliced: Any, stats: ReadStats) -> None:
        self._slice = sliced
        self._stats = stats
        self._full: torch.Tensor | None = None

    def get_shape(self) -> list[int]:
        return list(self._slice.get_shape())

    def get_dtype(self) -> str:
        return str(self._slice.get_dtype())

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._slice.get_shape())

    @property
    def ndim(self) -> int:
        return len(self._slice.get_shape())

    def dim(self) -> int:
        return self.ndim

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def dtype(self) -> torch.dtype:
        name = self.get_dtype()
        if name not in _SAFETENSORS_DTYPES:
            return self.full_tensor().dtype
        return _SAFETENSORS_DTYPES[name]

    def __getitem__(self, index: Any) -> torch.Tensor:
        if self._full is not None:
            return self._full[index]
        tensor = self._slice[index]
        self._stats.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * self.ndim
        index[dim] = slice(start, start + length)
        return self[tuple(index)]

    def full_tensor(self) -> torch.Tensor:
        """The whole tensor, read once."""
        if self._full is None:
            self._full = self[tuple(slice(None) for _ in range(self.ndim))] if self.ndim else self[()]
        return self._full

    def __getattr__(self, name: str) -> Any:
        return getattr(self.full_tensor(), name)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*_materialise(args), **_materialise(kwargs or {}))


def _materialise(value: Any) -> Any:
    if isinstance(value, CountingSlice):
        return value.full_tensor()
    if isinstance(value, (list, tuple)):
        return type(value)(_materialise(item) for item in value)
    if isinstance(value, dict):
        return {key: _materialise(item) for key, item in value.items()}
    return value


def sharded_safetensors_iterator(
    files: list[str], stats: ReadStats, use_tqdm: bool = True
) -> Iterator[tuple[str, Any]]:
    """The checkpoint for a tensor-parallel rank: matrices as `CountingSlice`s, so each
    weight_loader reads only its rank's rows or columns; vectors and scalars (norms, biases,
    quantization scales) whole, since they are small and often replicated. `stats` counts the
    bytes actually read. Like `safetensors_slices_iterator`, consume each item at once."""
    for path in _progress(files, "Loading safetensors checkpoint shards", use_tqdm):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                stats.num_tensors += 1
                sliced = f.get_slice(name)
                if len(sliced.get_shape()) < 2:
                    tensor = f.get_tensor(name)
                    stats.bytes_read += tensor.numel() * tensor.element_size()
                    yield name, tensor
                else:
                    yield name, CountingSlice(sliced, stats)


def counted_weights_iterator(
    weights: Iterable[tuple[str, torch.Tensor]], stats: ReadStats
) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights` unchanged, adding each whole tensor's bytes to `stats` (formats without
    sliced reads, such as .bin files, which every rank reads whole)."""
    for name, tensor in weights:
        stats.num_tensors += 1
        stats.bytes_read += tensor.numel() * tensor.element_size()
        yield name, tensor


def _load_pt_file(path: str) -> Any:
    # weights_only=True uses torch's restricted unpickler: tensors and plain containers load,
    # anything that would run code (a pickled class, os.system) is refused.
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Files from torch.save(_use_new_zipfile_serialization=False) cannot be mapped (a
            # RuntimeError whose wording varies by torch version); a truly broken file fails
            # again below with torch's own message.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Refusing to load {path}: it holds pickled Python objects, not just tensors "
            f"(torch.load weights_only=True failed: {str(error).splitlines()[0]}). pagedllm never "
            "unpickles code; convert the checkpoint to safetensors, or use load_format='safetensors' "
            "if the folder also has .safetensors files."
        ) from None


def pt_weights_iterator(files: list[str], use_tqdm: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of PyTorch .bin/.pt state-dict files, loaded with weights_only=True."""
    for path in _progress(files, "Loading pt checkpoint shards", use_tqdm):
        state = _load_pt_file(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # Lightning-style wrapper
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor.")
            yield name, tensor
        del state


@torch.no_grad()
def initialize_dummy_weights(
    model: torch.nn.Module, low: float = -1e-3, high: float = 1e-3, seed: int = 0
) -> None:
    """Fill every floating-point parameter with uniform values in [low, high), the same values
    for the same model and seed (parameters in `named_parameters` order, one generator per
    device). Small values keep activations finite through deep stacks, like vLLM's dummy
    format. Integer parameters (packed quantized weights) are zeroed. Buffers (rotary caches)
    are left alone: they are computed, not loaded."""
    generators: dict[torch.device, torch.Generator] = {}
    for _, param in model.named_parameters():
        data = param.data
        if not data.is_floating_point():
            data.zero_()
            continue
        generator = generators.get(data.device)
        if generator is None:
            generator = torch.Generator(device=data.device).manual_seed(seed)
            generators[data.device] = generator
        if data.element_size() < 2:
            # uniform_ has no fp8 kernel: draw in float16 and cast.
            tmp = torch.empty(data.shape, dtype=torch.float16, device=data.device)
            tmp.uniform_(low, high, generator=generator)
            data.copy_(tmp)
        else:
            data.uniform_(low, high, generator=generator)
