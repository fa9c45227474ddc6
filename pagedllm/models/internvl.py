"""InternVL: InternViT encodes each 448 px tile (dynamic tiling of an image plus a thumbnail),
its CLS token is dropped, pixel shuffle folds each 2x2 patch block into one token
(downsample_ratio 0.5: 1024 patches → 256 tokens), an MLP projects them into the language
model, and they replace the `<IMG_CONTEXT>` placeholder embeddings of a Qwen2 (or Llama,
Qwen3) language model reused from our text families.

Two checkpoint layouts map onto the same modules:
- transformers' `InternVLForConditionalGeneration` (model.vision_tower.*, model.multi_modal_projector.*,
  model.language_model.*, lm_head);
- InternVL2's remote-code `InternVLChatModel` (vision_model.*, mlp1.*, language_model.model.*,
  language_model.lm_head), whose config.json (llm_config, vision_config, select_layer, ...)
  internvl_config.py reads without remote code.

Multi-modal interface (pagedllm/multimodal, worker/multimodal_runner.py): `supports_multimodal`,
the `multimodal_config` constructor argument (every modality at 0: no vision tower),
`embed_multimodal(modality, data)` for one processed image (all its tiles), and
`get_input_embeddings(input_ids)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagedllm.layers.quantization.base import QuantizationConfig
from pagedllm.models.intern_vit import InternVisionModel
from pagedllm.models.registry import get_model_class
from pagedllm.models.siglip import vision_activation
from pagedllm.models.utils import (
    ImageTilesEmbeddingMixin, builds_vision_tower, load_weights_by_mapping, maybe_prefix,
)

_LANGUAGE_MODELS = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# transformers' InternVLForConditionalGeneration names (in memory: model.vision_tower.*; as saved:
# vision_tower.*, language_model.model.*) → ours (InternVL's own layout).
_HF_NAME_PARTS = (
    ("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
    ("vision_tower.embeddings.patch_embeddings.projection.", "vision_model.embeddings.patch_embedding."),
    ("vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
    ("vision_tower.encoder.layer.", "vision_model.encoder.layers."),
    ("multi_modal_projector.layer_norm.", "mlp1.0."),
    ("multi_modal_projector.linear_1.", "mlp1.1."),
    ("multi_modal_projector.linear_2.", "mlp1.3."),
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
_HF_LAYER_PARTS = (
    (".attention.projection_layer.", ".attn.proj."),
    (".attention.", ".attn."),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
    (".lambda_1", ".ls1"),
    (".lambda_2", ".ls2"),
)
_VISION_PREFIXES = ("vision_model.", "mlp1.")
_VISION_CHECKPOINT_PREFIXES = (
    *_VISION_PREFIXES, "vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
)


def to_internvl_name(name: str) -> str:
    """Any supported checkpoint name → our parameter name."""
    if name.startswith(("vision_model.", "mlp1.", "language_model.model.", "language_model.lm_head.")):
        return name.replace(".attn.qkv.", ".attn.qkv_proj.")  # InternVL's own layout
    if name.startswith("model."):
        name = name[len("model."):]
    for old, new in _HF_NAME_PARTS:
        if name.startswith(old):
            name = new + name[len(old):]
            if new == "vision_model.encoder.layers.":
                for old_part, new_part in _HF_LAYER_PARTS:
                    name = name.replace(old_part, new_part)
            return name
    return name


def _vision_layers_used(vision_config: Any, select_layer: int) -> int:
    total = vision_config.num_hidden_layers
    used = total + 1 + select_layer if select_layer < 0 else select_layer
    if not 1 <= used <= total:
        raise ValueError(
            f"select_layer / vision_feature_layer={select_layer} is outside the vision tower's "
            f"{total} layers; use -1 (the last layer) or another index in [-{total}, {total}]."
        )
    return used


def pixel_shuffle(features: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """[B, W, H, C] → [B, H * s, W * s, C / s^2] (InternVL's "v2" pixel shuffle)."""
    batch, width, height, channels = features.shape
    features = features.reshape(batch, width, int(height * scale_factor), int(channels / scale_factor))
    features = features.permute(0, 2, 1, 3).reshape(
        batch, int(height * scale_factor), int(width * scale_factor), int(channels / scale_factor**2)
    )
    return features.permute(0, 2, 1, 3)


class _Activation(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.fn = vision_activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class InternVLProjector(nn.Sequential):
    """mlp1: LayerNorm → Linear → GELU → Linear, indexed 0, 1, 3 as the checkpoints name it."""

    def __init__(self, vision_hidden: int, text_hidden: int, activation: str) -> None:
        super().__init__(
            nn.LayerNorm(vision_hidden), nn.Linear(vision_hidden, text_hidden), _Activation(activation),
            nn.Linear(text_hidden, text_hidden),
        )


class InternVLForConditionalGeneration(ImageTilesEmbeddingMixin, nn.Module):
    vision_checkpoint_prefixes = _VISION_CHECKPOINT_PREFIXES
    """Checkpoint tensors of the vision tower and projector (skipped unread when not built)."""
    supports_multimodal = True
    family_name = "InternVL"

    def __init__(
        self, hf_config: Any, quant_config: QuantizationConfig | None = None, prefix: str = "",
        multimodal_config: Any = None,
    ) -> None:
        """With every modality limited to 0 (multimodal_config.is_text_only) no vision tower
        or projector is built; their checkpoint tensors are then skipped, never read."""
        super().__init__()
        self.config = hf_config
        text_config = hf_config.text_config
        vision_config = hf_config.vision_config
        self.image_token_id = int(hf_config.image_token_id)
        self.downsample_ratio = float(hf_config.downsample_ratio)
        if getattr(hf_config, "vision_feature_select_strategy", "default") != "default":
            raise ValueError(
                f"vision_feature_select_strategy={hf_config.vision_feature_select_strategy!r} is not "
                "supported; InternVL drops the CLS token ('default')."
            )
        if not getattr(vision_config, "use_mean_pooling", True):
            raise ValueError("vision_config.use_mean_pooling=false (a final vision LayerNorm) is not supported.")
        self.multimodal_enabled = builds_vision_tower(multimodal_config)
        # Read by the loader: tensors under these prefixes are skipped without being read.
        self.skipped_checkpoint_prefixes = () if self.multimodal_enabled else self.vision_checkpoint_prefixes
        self.num_vision_layers = _vision_layers_used(vision_config, int(hf_config.vision_feature_layer))
        if self.multimodal_enabled:
            self.vision_model = InternVisionModel(
                vision_config, prefix=maybe_prefix(prefix, "vision_model"), num_layers=self.num_vision_layers
            )
            folded = vision_config.hidden_size * int(round(1 / self.downsample_ratio)) ** 2
            self.mlp1 = InternVLProjector(folded, text_config.hidden_size, hf_config.projector_hidden_act)
        model_type = getattr(text_config, "model_type", None)
        if model_type not in _LANGUAGE_MODELS:
            raise ValueError(
                f"InternVL language model type {model_type!r} is not supported; supported: "
                f"{', '.join(sorted(_LANGUAGE_MODELS))} (InternVL2-1B and InternVL2.5/3 use qwen2; InternLM2-based "
                "checkpoints such as InternVL2-2B are not supported)."
            )
        self.language_model = get_model_class(_LANGUAGE_MODELS[model_type])(
            text_config, quant_config, prefix=maybe_prefix(prefix, "language_model")
        )
        # transformers ties the output embedding when the top-level config says so, whatever
        # text_config says (its checkpoints then hold no lm_head).
        if getattr(hf_config, "tie_word_embeddings", False) and not self.language_model.tie_word_embeddings:
            self.language_model.lm_head.tie_weights(self.language_model.model.embed_tokens)
            self.language_model.tie_word_embeddings = True

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] (tiles) → [N, num_image_token, hidden]."""
        features = self.vision_model(pixel_values)[:, 1:]
        batch, num_tokens, channels = features.shape
        side = int(round(num_tokens**0.5))
        features = pixel_shuffle(features.reshape(batch, side, side, channels), self.downsample_ratio)
        return self.mlp1(features.reshape(batch, -1, features.shape[-1]))

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings; the runner writes the image rows over the <IMG_CONTEXT> tokens."""
        return self.language_model.get_input_embeddings(input_ids)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.language_model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip: tuple[str, ...] = ()
        if self.language_model.tie_word_embeddings:
            skip += ("language_model.lm_head.",)
        if not self.multimodal_enabled:
            skip += _VISION_PREFIXES
        unused_layers = tuple(
            f"vision_model.encoder.layers.{i}."
            for i in range(self.num_vision_layers, self.config.vision_config.num_hidden_layers)
        )
        renamed = ((to_internvl_name(name), tensor) for name, tensor in weights)
        mapping = self.language_model.packed_modules_mapping
        return load_weights_by_mapping(self, renamed, mapping, skip + unused_layers)


# InternVL2's remote-code checkpoints name the same model differently; config.json differs too
# (internvl_config.py turns it into the attributes read above).
InternVLChatModel = InternVLForConditionalGeneration
