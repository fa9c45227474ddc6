"""Gemma 3 with images: a SigLIP tower encodes each 896 px image (or pan-and-scan crop), the
projector average-pools its patch grid to mm_tokens_per_image tokens, RMS-normalises and
projects them into the text embedding space, and those rows replace the image placeholder
tokens' embeddings. During prefill the tokens of one image attend to each other in both
directions (causal elsewhere), as transformers' Gemma 3 masks do.

Multi-modal interface (pagedllm/multimodal, worker/multimodal_runner.py): `supports_multimodal`,
the `multimodal_config` constructor argument (every modality at 0: no vision tower),
`embed_multimodal(modality, data)` for one processed image (its crops included), and
`get_input_embeddings(input_ids)`. `forward` needs input_ids to still hold the image
placeholder ids: each prefill step's bidirectional image spans are derived from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from pagedllm.forward_context import get_forward_context, set_forward_context
from pagedllm.layers.logits_processor import LogitsProcessor
from pagedllm.layers.quantization.base import QuantizationConfig
from pagedllm.layers.vocab_embedding import ParallelLMHead
from pagedllm.models.gemma3 import Gemma3TextModel, GemmaRMSNorm
from pagedllm.models.siglip import SiglipVisionModel
from pagedllm.models.utils import (
    ImageTilesEmbeddingMixin, builds_vision_tower, load_weights_by_mapping, maybe_prefix,
)

# Checkpoint name prefixes (transformers 4 hub layout, transformers 5 in-memory and saved
# layouts) → ours.
_NAME_PREFIXES = (
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")
_VISION_CHECKPOINT_PREFIXES = (*_VISION_PREFIXES, "model.vision_tower.", "model.multi_modal_projector.")


def normalize_checkpoint_name(name: str, prefixes: Sequence[tuple[str, str]]) -> str:
    for old, new in prefixes:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class Gemma3MultiModalProjector(nn.Module):
    """[B, patches, vision_hidden] → [B, mm_tokens_per_image, text_hidden]."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        vision = config.vision_config
        self.mm_input_projection_weight = nn.Parameter(
            torch.empty(vision.hidden_size, config.text_config.hidden_size), requires_grad=False
        )
        self.mm_soft_emb_norm = GemmaRMSNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.patches_per_side = vision.image_size // vision.patch_size
        tokens_per_side = int(round(config.mm_tokens_per_image**0.5))
        if tokens_per_side**2 != config.mm_tokens_per_image or self.patches_per_side % tokens_per_side:
            raise ValueError(
                f"mm_tokens_per_image={config.mm_tokens_per_image} must be a square whose side divides "
                f"the patch grid side {self.patches_per_side} (image_size / patch_size), e.g. 256 for 64."
            )
        self.kernel_size = self.patches_per_side // tokens_per_side

    def forward(self, vision_outputs: torch.Tensor) -> torch.Tensor:
        batch, _, hidden = vision_outputs.shape
        grid = vision_outputs.transpose(1, 2).reshape(batch, hidden, self.patches_per_side, self.patches_per_side)
        pooled = nn.functional.avg_pool2d(grid, self.kernel_size, self.kernel_size).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight).type_as(vision_outputs)


def image_token_spans(
    input_ids: torch.Tensor, positions: torch.Tensor, image_token_id: int, query_start_loc: list[int]
) -> list[list[tuple[int, int]]] | None:
    """Per request, the [start, end) positions of each run of consecutive image tokens among
    this step's tokens (one run per image or crop); None when the step has no image token."""
    token_indices = torch.nonzero(input_ids == image_token_id).flatten().tolist()
    if not token_indices:
        return None
    token_positions = positions[token_indices].tolist()
    spans: list[list[tuple[int, int]]] = [[] for _ in range(len(query_start_loc) - 1)]
    request = 0
    previous_index = -2
    for index, position in zip(token_indices, token_positions):
        while index >= query_start_loc[request + 1]:
            request += 1
        runs = spans[request]
        if runs and index == previous_index + 1 and position == runs[-1][1]:
            runs[-1] = (runs[-1][0], position + 1)
        else:
            runs.append((position, position + 1))
        previous_index = index
    return spans


class Gemma3ForConditionalGeneration(ImageTilesEmbeddingMixin, nn.Module):
    vision_checkpoint_prefixes = _VISION_CHECKPOINT_PREFIXES
    """Checkpoint tensors of the vision tower and projector (skipped unread when not built)."""
    supports_multimodal = True
    family_name = "Gemma 3"
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(
        self, hf_config: Any, quant_config: QuantizationConfig | None = None, prefix: str = "",
        multimodal_config: Any = None,
    ) -> None:
        """With every modality limited to 0 (multimodal_config.is_text_only) no vision tower
        or projector is built; their checkpoint tensors are then skipped, never read."""
        super().__init__()
        self.config = hf_config
        text_config = hf_config.text_config
        self.image_token_id = int(hf_config.image_token_id)
        self.mm_tokens_per_image = int(hf_config.mm_tokens_per_image)
        self.multimodal_enabled = builds_vision_tower(multimodal_config)
        # Read by the loader: tensors under these prefixes are skipped without being read.
        self.skipped_checkpoint_prefixes = () if self.multimodal_enabled else self.vision_checkpoint_prefixes
        if self.multimodal_enabled:
            # The vision tower is small and runs once per image: unquantized.
            self.vision_tower = SiglipVisionModel(hf_config.vision_config, prefix=maybe_prefix(prefix, "vision_tower"))
            self.multi_modal_projector = Gemma3MultiModalProjector(hf_config)
        self.language_model = Gemma3TextModel(text_config, quant_config, prefix=maybe_prefix(prefix, "language_model"))
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(
            text_config.vocab_size, text_config.hidden_size, prefix=maybe_prefix(prefix, "lm_head")
        )
        if self.tie_word_embeddings:
            self.lm_head.tie_weights(self.language_model.embed_tokens)
        self.logits_processor = LogitsProcessor(
            text_config.vocab_size, soft_cap=getattr(text_config, "final_logit_softcapping", None)
        )

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] (images or pan-and-scan crops) → [N, mm_tokens_per_image, hidden]."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scaled text embeddings (placeholder ids outside the vocabulary read row 0); the
        runner then writes the image rows, unscaled, over the placeholders as transformers does."""
        vocab_size = self.config.text_config.vocab_size
        return self.language_model.embed(input_ids.masked_fill(input_ids >= vocab_size, 0))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        if inputs_embeds is None:
            # The runner passes embeddings whenever a step holds image tokens: none here.
            return self.language_model(input_ids, positions, self.get_input_embeddings(input_ids))
        metadata = get_forward_context().attn_metadata
        spans = None
        if metadata.max_query_len > 1:  # decode rows never hold image tokens
            spans = image_token_spans(input_ids, positions, self.image_token_id, metadata.query_start_loc_cpu)
        if spans is None:
            return self.language_model(input_ids, positions, inputs_embeds)
        with set_forward_context(dataclasses.replace(metadata, bidirectional_spans=spans)):
            return self.language_model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ("lm_head.",) if self.tie_word_embeddings else ()
        if not self.multimodal_enabled:
            skip += _VISION_PREFIXES
        renamed = ((normalize_checkpoint_name(name, _NAME_PREFIXES), tensor) for name, tensor in weights)
        return load_weights_by_mapping(self, renamed, self.packed_modules_mapping, skip)

