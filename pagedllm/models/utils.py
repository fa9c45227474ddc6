"""Pieces every model family shares: the checkpoint-name → parameter loading loop and a few
config readers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pagedllm.layers.linear import QKVParallelLinear
from pagedllm.layers.quantization.base import LoadedWeight, copy_loaded_weight

# Buffers some checkpoints saved that are recomputed here, never loaded.
_RECOMPUTED_BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def default_weight_loader(param: nn.Parameter, loaded: LoadedWeight, shard_id: Any = None) -> None:
    """Copy a whole, unsharded checkpoint tensor (norm weights and other replicated ones)."""
    copy_loaded_weight(param.data, loaded, "parameter")


def maybe_prefix(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def head_dim_of(hf_config: Any) -> int:
    head_dim = getattr(hf_config, "head_dim", None)
    return int(head_dim or hf_config.hidden_size // hf_config.num_attention_heads)


def sliding_window_of(hf_config: Any, layer_idx: int) -> int | None:
    """The layer's attention window: from `layer_types` when the config has it (Qwen2/3,
    Gemma), else the config-wide `sliding_window` (Mistral), else None."""
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        if layer_types[layer_idx] != "sliding_attention":
            return None
    return getattr(hf_config, "sliding_window", None) or None


def _shard_id_of(model: nn.Module, fused_module_name: str, index: int) -> Any:
    module = model.get_submodule(fused_module_name)
    return "qkv"[index] if isinstance(module, QKVParallelLinear) else index


def load_weights_by_mapping(
    model: nn.Module,
    weights: Iterable[tuple[str, LoadedWeight]],
    packed_modules_mapping: Mapping[str, Sequence[str]],
    skip_prefixes: Sequence[str] = (),
) -> set[str]:
    """Load checkpoint tensors (HF names) into `model`'s parameters; returns the names of the
    parameters filled. Separate checkpoint matrices that the model fuses (q/k/v → qkv_proj)
    go through the fused parameter's weight_loader with their shard id, and a fused parameter
    counts as loaded once all its parts are. Tensors that match no parameter are an error."""
    params = dict(model.named_parameters())
    part_to_fused = {
        part: (fused, index)
        for fused, parts in packed_modules_mapping.items()
        for index, part in enumerate(parts)
    }
    parts_seen: dict[str, set[Any]] = {}
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        if name.endswith(_RECOMPUTED_BUFFER_SUFFIXES) or name.startswith(tuple(skip_prefixes)):
            continue
        param_name, shard_id, num_parts = name, None, 1
        if name not in params:
            components = name.split(".")
            for i, component in enumerate(components[:-1]):
                if component in part_to_fused:
                    fused, index = part_to_fused[component]
                    fused_module = ".".join([*components[:i], fused])
                    param_name = ".".join([fused_module, *components[i + 1 :]])
                    if param_name in params:
                        shard_id = _shard_id_of(model, fused_module, index)
                        num_parts = len(packed_modules_mapping[fused])
                    break
        param = params.get(param_name)
        if param is None:
            unexpected.append(name)
            continue
        weight_loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            if shard_id is None:
                weight_loader(param, tensor)
            else:
                weight_loader(param, tensor, shard_id)
        except torch.OutOfMemoryError:
            raise
        except (ValueError, RuntimeError, IndexError) as error:
            # A tensor of the wrong shape fails inside the slicing (narrow) with no name.
            shape = getattr(tensor, "shape", None)
            raise ValueError(
                f"Loading checkpoint tensor {name}{'' if shape is None else f' of shape {tuple(shape)}'} into "
                f"{param_name} {tuple(param.shape)}: {error}"
            ) from error
        if shard_id is None:
            loaded.add(param_name)
            continue
        parts_seen.setdefault(param_name, set()).add(shard_id)
        if len(parts_seen[param_name]) == num_parts:
            loaded.add(param_name)
    if unexpected:
        raise UnexpectedTensorsError(
            f"The checkpoint has {len(unexpected)} tensor(s) that match no parameter of "
            f"{type(model).__name__}: {', '.join(unexpected)}. The checkpoint and its "
            "config.json (architectures, tie_word_embeddings, layer counts) disagree.",
            loaded,
        )
    return loaded


class UnexpectedTensorsError(ValueError):
    """Checkpoint tensors no parameter takes; `loaded` holds what was filled, so that the
    loader can name the parameters left empty in the same error."""

    def __init__(self, message: str, loaded: set[str]) -> None:
        super().__init__(message)
        self.loaded = loaded


def builds_vision_tower(multimodal_config: Any) -> bool:
    """Whether a multi-modal family builds its vision tower: not when every modality is limited
    to 0 (multimodal_config.is_text_only), and then its checkpoint tensors are skipped unread."""
    return multimodal_config is None or not multimodal_config.is_text_only


class ImageTilesEmbeddingMixin:
    """`embed_multimodal` / `embed_multimodal_batch` for image-only families whose processed
    image is {"pixel_values": [num_tiles, 3, S, S]} (crops or tiles of one image) and whose
    `encode_images([N, 3, S, S]) -> [N, tokens_per_tile, hidden]`: an image's placeholder rows
    are its tiles' tokens in order."""

    family_name: str = "This model"
    # False when the engine limits images to 0 and the tower was not built (builds_vision_tower).
    multimodal_enabled: bool = True

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_image(self, modality: str) -> None:
        if modality != "image":
            raise ValueError(f"{self.family_name} takes image inputs only, not {modality!r}.")
        if not self.multimodal_enabled:
            raise ValueError(
                "This engine has limit_mm_per_prompt={'image': 0}: the vision tower is not loaded; "
                "raise the image limit to send images."
            )

    def embed_multimodal(self, modality: str, data: Mapping[str, Any]) -> torch.Tensor:
        """One image → [num_tiles * tokens_per_tile, hidden]."""
        self._check_image(modality)
        return self.encode_images(data["pixel_values"]).flatten(0, 1)

    def embed_multimodal_batch(self, modality: str, datas: list[Mapping[str, Any]]) -> list[torch.Tensor]:
        """Several images (tiles of one size) in one encoder call."""
        self._check_image(modality)
        features = self.encode_images(torch.cat([data["pixel_values"] for data in datas]))
        sizes = [data["pixel_values"].shape[0] for data in datas]
        return [chunk.flatten(0, 1) for chunk in features.split(sizes)]
