"""Build a model and fill its weights, by load format.

`get_model` builds the skeleton directly on the target device in the model's dtype, then the
loader for `load_config.load_format` streams checkpoint tensors into it through the model's
`load_weights`. Loading is strict: every checkpoint tensor must find a parameter (the model's
`load_weights` raises on unexpected names) and every parameter must be filled (checked here).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from types import MappingProxyType
from typing import Any, Protocol, cast

import torch

from pagedllm.config import LoadConfig, ModelConfig
from pagedllm.layers.quantization.quantized_activation import link_activation_quantization
from pagedllm.model_loader.weight_utils import (
    ReadStats,
    counted_weights_iterator,
    find_weight_files,
    initialize_dummy_weights,
    pt_weights_iterator,
    safetensors_weights_iterator,
    sharded_safetensors_iterator,
)
from pagedllm.worker.memory_profiler import format_gib

logger = logging.getLogger(__name__)

# How many missing parameter names an error lists before it just counts them.
_MAX_NAMES_SHOWN = 10


class LoadableModel(Protocol):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Consume checkpoint tensors (HF names); return the names of the parameters filled.
        Raises ValueError on a name that matches no parameter. Under tensor parallelism the
        matrices come as `CountingSlice`s (weight_utils.py): index or narrow them to read
        only this rank's part; any other use reads them whole."""
        ...


@contextlib.contextmanager
def set_default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Make `dtype` torch's default floating dtype inside the block, restoring the previous
    one after (even on error), so parameters created with torch.empty get the model dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def get_model(
    model_config: ModelConfig, load_config: LoadConfig, device: torch.device | str
) -> torch.nn.Module:
    """The model of `model_config` on `device`, weights loaded per `load_config`, in eval mode;
    its linear layers quantized per `model_config.quantization`."""
    from pagedllm.layers.quantization import get_quantization_config
    from pagedllm.models.registry import get_model_class

    quant_config = get_quantization_config(model_config.quantization, model_config.hf_config)

    start = time.perf_counter()
    load_format = "gguf" if model_config.gguf_file is not None else load_config.load_format
    loader = _LOADERS.get(load_format)
    if loader is None:
        raise ValueError(
            f"load_format={load_format!r} is not supported; use one of {', '.join(map(repr, _LOADERS))}."
        )
    model_class = get_model_class(model_config.architecture)
    # Multi-modal models take their limits (every modality 0: no vision tower is built).
    extra: dict[str, Any] = {}
    if getattr(model_class, "supports_multimodal", False):
        extra["multimodal_config"] = model_config.multimodal_config
    with torch.device(device), set_default_dtype(model_config.dtype):
        model = model_class(model_config.hf_config, quant_config=quant_config, **extra)
    # A sharded state was saved after post-processing (as vLLM's is): give the parameters
    # their processed shapes first, then copy the saved values over them.
    process_first = load_format == "sharded_state"
    if process_first:
        _process_weights_after_loading(model)
    stats = ReadStats()
    loader(model, model_config, load_config, stats)
    if not process_first:
        _process_weights_after_loading(model)
    link_activation_quantization(model)
    # Inference only: no autograd graph is ever wanted through the weights.
    model.requires_grad_(False).eval()
    # The worker reports what this rank read (tests check that ranks read only their shards).
    model.load_stats = stats
    weight_bytes = model_weight_bytes(model)
    logger.info(
        "Loaded %s (%s%s, load_format %s) on %s: %s of weights (%s bytes), %s read from checkpoint files, in %.1f s.",
        model_config.architecture, str(model_config.dtype).removeprefix("torch."),
        f", quantization {model_config.quantization}" if model_config.quantization else "", load_format,
        device, format_gib(weight_bytes), f"{weight_bytes:,}", format_gib(stats.bytes_read),
        time.perf_counter() - start,
    )
    return model


def _process_weights_after_loading(model: torch.nn.Module) -> None:
    for module in model.modules():
        quant_method = getattr(module, "quant_method", None)
        if quant_method is not None and hasattr(quant_method, "process_weights_after_loading"):
            quant_method.process_weights_after_loading(module)


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters (tied parameters counted once)."""
    return sum(param.numel() * param.element_size() for param in model.parameters())


def load_weights_strict(
    model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]], source: str
) -> None:
    """Feed `weights` to `model.load_weights` and check that every parameter was filled;
    `source` (the checkpoint folder or file) goes into the error."""
    from pagedllm.models.utils import UnexpectedTensorsError

    unexpected_error = None
    try:
        loaded = cast(LoadableModel, model).load_weights(weights)
    except UnexpectedTensorsError as error:  # named together with what is missing, if anything
        loaded, unexpected_error = error.loaded, error
    if not isinstance(loaded, set):
        raise TypeError(
            f"{type(model).__name__}.load_weights must return the set of parameter names it filled."
        )
    # Parameters computed while loading (dynamic fp8 scales) need no checkpoint tensor.
    expected = {
        name for name, param in model.named_parameters()
        if not getattr(param, "optional_in_checkpoint", False)
    }
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(_checkpoint_names(model, name) for name in missing[:_MAX_NAMES_SHOWN])
        more = f" and {len(missing) - _MAX_NAMES_SHOWN} more" if len(missing) > _MAX_NAMES_SHOWN else ""
        also = f" {unexpected_error}" if unexpected_error is not None else ""
        raise ValueError(
            f"The checkpoint {source} lacks {len(missing)} parameter(s) of {type(model).__name__}: "
            f"{shown}{more}. The checkpoint is incomplete or belongs to another architecture; "
            f"use a complete checkpoint, or load_format='dummy' for random weights.{also}"
        )
    if unexpected_error is not None:
        raise ValueError(str(unexpected_error))


def _checkpoint_names(model: torch.nn.Module, name: str) -> str:
    """A parameter's name, with the checkpoint tensors it is fused from (qkv_proj from q_proj,
    k_proj and v_proj): one of those is what the checkpoint lacks."""
    for fused, parts in (getattr(model, "packed_modules_mapping", None) or {}).items():
        if f".{fused}." in name:
            sources = ", ".join(name.replace(f".{fused}.", f".{part}.") for part in parts)
            return f"{name} (from {sources})"
    return name


def _load_checkpoint(
    model: torch.nn.Module, model_config: ModelConfig, load_config: LoadConfig, stats: ReadStats
) -> None:
    from pagedllm.distributed.parallel_state import get_tp_size

    files, weight_format = find_weight_files(model_config.model_path, load_config.load_format)
    weights: Iterable[tuple[str, Any]]
    # A model that skips part of its checkpoint (a text-only multi-modal model's vision
    # tower) also reads lazily, so the matrices it skips are never read.
    skips_tensors = bool(getattr(model, "skipped_checkpoint_prefixes", ()))
    if weight_format == "safetensors" and (get_tp_size() > 1 or skips_tensors):
        # Sliced reads: each tensor-parallel rank reads only the rows or columns it keeps.
        weights = sharded_safetensors_iterator(files, stats)
    elif weight_format == "safetensors":
        weights = counted_weights_iterator(safetensors_weights_iterator(files), stats)
    else:
        # A pickled .bin cannot be read in part: every rank reads every tensor whole.
        weights = counted_weights_iterator(pt_weights_iterator(files), stats)
    load_weights_strict(model, weights, model_config.model_path)


def _load_gguf(
    model: torch.nn.Module, model_config: ModelConfig, load_config: LoadConfig, stats: ReadStats
) -> None:
    from pagedllm.model_loader.gguf import gguf_weights_iterator

    if model_config.gguf_file is None:
        raise ValueError(f"load_format='gguf' needs model= to be a .gguf file, got {model_config.model!r}.")
    weights = gguf_weights_iterator(model_config.gguf_file, model_config.hf_config)
    load_weights_strict(model, counted_weights_iterator(weights, stats), model_config.gguf_file)


def _load_dummy(
    model: torch.nn.Module, model_config: ModelConfig, load_config: LoadConfig, stats: ReadStats
) -> None:
    initialize_dummy_weights(model)
    # Quantized parameters need values that make sense for them (positive scales, ...).
    for module in model.modules():
        quant_method = getattr(module, "quant_method", None)
        if quant_method is not None and hasattr(quant_method, "initialize_dummy_weights"):
            quant_method.initialize_dummy_weights(module)


def _load_sharded_state(
    model: torch.nn.Module, model_config: ModelConfig, load_config: LoadConfig, stats: ReadStats
) -> None:
    from pagedllm.distributed.parallel_state import get_tp_rank, get_tp_size
    from pagedllm.model_loader.sharded_state import check_sharded_state_folder, load_rank_state

    pattern = load_config.sharded_state_pattern
    check_sharded_state_folder(model_config.model_path, get_tp_size(), model_config.quantization, pattern)
    load_rank_state(model, model_config.model_path, get_tp_rank(), stats, pattern)


_Loader = Callable[[torch.nn.Module, ModelConfig, LoadConfig, ReadStats], None]
# load_format -> loader; read-only so no caller can change how another engine loads.
_LOADERS: MappingProxyType[str, _Loader] = MappingProxyType(
    {
        "auto": _load_checkpoint,
        "safetensors": _load_checkpoint,
        "pt": _load_checkpoint,
        "dummy": _load_dummy,
        "gguf": _load_gguf,
        "sharded_state": _load_sharded_state,
    }
)
