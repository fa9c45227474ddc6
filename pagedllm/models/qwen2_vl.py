"""Qwen2-VL: a ViT over 14x14 patches (2 frames deep) with 2-D rotary positions, a patch
merger folding 2x2 patches into one language-model token, and the Qwen2 decoder with M-RoPE.

Checkpoint names (transformers >= 4.52): model.visual.*, model.language_model.*, lm_head.*;
older checkpoints (visual.*, model.layers.*) are renamed on load.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.config import MultiModalConfig
from pagedllm.layers.encoder_attention import varlen_attention
from pagedllm.layers.linear import ReplicatedLinear
from pagedllm.layers.logits_processor import LogitsProcessor
from pagedllm.layers.mrope import MRotaryEmbedding
from pagedllm.layers.quantization.base import QuantizationConfig
from pagedllm.layers.rotary_embedding import rope_parameters_of
from pagedllm.layers.vocab_embedding import ParallelLMHead
from pagedllm.models.llama import LlamaModel
from pagedllm.models.qwen2 import Qwen2DecoderLayer
from pagedllm.models.utils import builds_vision_tower, head_dim_of, load_weights_by_mapping

logger = logging.getLogger(__name__)

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def vision_activation(name: str) -> Any:
    if name not in _ACTIVATIONS:
        raise ValueError(f"vision hidden_act={name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]


class VisionPatchEmbed(nn.Module):
    """Conv3d with kernel = stride over flattened patches is one matmul; the weight keeps the
    checkpoint's [embed_dim, C, t, p, p] shape."""

    def __init__(self, patch_size: int, temporal_patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(
            torch.empty(embed_dim, in_channels, temporal_patch_size, patch_size, patch_size), requires_grad=False
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(pixels.to(weight.dtype), weight.view(weight.shape[0], -1))


class VisionRotary(nn.Module):
    """2-D rope of the encoder: half the rotary features follow the patch row, half its column."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        spatial_dim = head_dim // 2
        exponents = torch.arange(0, spatial_dim, 2, dtype=torch.float32) / spatial_dim
        self.register_buffer("inv_freq", 1.0 / theta**exponents, persistent=False)

    def forward(self, grid_thw: list[list[int]], merge_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.inv_freq.device
        rows = []
        for t, h, w in grid_thw:
            hpos, wpos = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            shape = (h // merge_size, merge_size, w // merge_size, merge_size)
            hpos = hpos.reshape(shape).transpose(1, 2).flatten()
            wpos = wpos.reshape(shape).transpose(1, 2).flatten()
            rows.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
        positions = torch.cat(rows)
        freqs = (positions[..., None].float() * self.inv_freq).flatten(1)  # [N, head_dim // 2]
        freqs = torch.cat([freqs, freqs], dim=-1)
        return freqs.cos(), freqs.sin()


def apply_vision_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, head_dim], rotated in float32 as transformers does."""
    dtype = x.dtype
    x = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, prefix: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = ReplicatedLinear(dim, 3 * dim, bias=True, prefix=f"{prefix}.qkv")
        self.proj = ReplicatedLinear(dim, dim, bias=True, prefix=f"{prefix}.proj")

    def forward(self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        q, k = apply_vision_rope(q, cos, sin), apply_vision_rope(k, cos, sin)
        return self.proj(varlen_attention(q, k, v, cu_seqlens, self.head_dim**-0.5))


class Qwen2VisionBlock(nn.Module):
    def __init__(self, vision_config: Any, prefix: str) -> None:
        super().__init__()
        dim = vision_config.embed_dim
        hidden = int(dim * vision_config.mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, vision_config.num_heads, f"{prefix}.attn")
        self.mlp = nn.Module()
        self.mlp.fc1 = ReplicatedLinear(dim, hidden, bias=True, prefix=f"{prefix}.mlp.fc1")
        self.mlp.fc2 = ReplicatedLinear(hidden, dim, bias=True, prefix=f"{prefix}.mlp.fc2")
        self.act = vision_activation(vision_config.hidden_act)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.norm2(x))))


class PatchMerger(nn.Module):
    """merge_size x merge_size neighbouring patches (adjacent rows after the processor's
    ordering) concatenated, then a 2-layer MLP into the language model's width."""

    def __init__(self, out_dim: int, context_dim: int, merge_size: int, norm: nn.Module, prefix: str) -> None:
        super().__init__()
        self.hidden_size = context_dim * merge_size**2
        self.ln_q = norm
        self.mlp = nn.Sequential(
            ReplicatedLinear(self.hidden_size, self.hidden_size, bias=True, prefix=f"{prefix}.mlp.0"),
            nn.GELU(),
            ReplicatedLinear(self.hidden_size, out_dim, bias=True, prefix=f"{prefix}.mlp.2"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden_size))


def cu_seqlens_of(grid_thw: list[list[int]]) -> list[int]:
    """Each frame of each item attends over itself (transformers' get_vision_cu_seqlens)."""
    bounds = [0]
    for t, h, w in grid_thw:
        for _ in range(t):
            bounds.append(bounds[-1] + h * w)
    return bounds


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, vision_config: Any, prefix: str = "") -> None:
        super().__init__()
        self.merge_size = vision_config.spatial_merge_size
        dim = vision_config.embed_dim
        self.patch_embed = VisionPatchEmbed(
            vision_config.patch_size, vision_config.temporal_patch_size, vision_config.in_channels, dim
        )
        self.rotary_pos_emb = VisionRotary(dim // vision_config.num_heads, rope_parameters_of(vision_config)["rope_theta"])
        self.blocks = nn.ModuleList(
            Qwen2VisionBlock(vision_config, f"{prefix}.blocks.{i}") for i in range(vision_config.depth)
        )
        self.merger = PatchMerger(
            vision_config.hidden_size, dim, self.merge_size, nn.LayerNorm(dim, eps=1e-6), f"{prefix}.merger"
        )

    def forward(self, pixels: torch.Tensor, grid_thw: list[list[int]]) -> torch.Tensor:
        x = self.patch_embed(pixels)
        cos, sin = self.rotary_pos_emb(grid_thw, self.merge_size)
        cu_seqlens = cu_seqlens_of(grid_thw)
        for block in self.blocks:
            x = block(x, cu_seqlens, cos, sin)
        return self.merger(x)


class Qwen2VLForConditionalGeneration(nn.Module):
    vision_checkpoint_prefixes: tuple[str, ...] = ("model.visual.", "visual.")
    """Checkpoint tensors of the vision tower: skipped unread when it is not built (and left
    out of `pagedllm plan`'s weights)."""
    """The multi-modal model interface (what worker/multimodal_runner.py calls):
    `supports_multimodal`, `uses_mrope`, `get_input_embeddings(input_ids)`,
    `embed_multimodal(modality, data) -> [num_embeds, hidden]` for one item, and
    `forward(input_ids, positions, inputs_embeds=None)` with positions [T] or [3, T]."""

    supports_multimodal = True
    uses_mrope = True
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    vision_tower_cls: Any = Qwen2VisionTransformer

    def __init__(
        self, hf_config: Any, quant_config: QuantizationConfig | None = None, prefix: str = "",
        multimodal_config: MultiModalConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = hf_config
        text_config = hf_config.get_text_config()
        self.model = nn.Module()
        # With every modality limited to 0 the tower is never built: its weights are skipped.
        self.multimodal_enabled = builds_vision_tower(multimodal_config)
        self.model.visual = (
            self.vision_tower_cls(hf_config.vision_config, prefix="model.visual") if self.multimodal_enabled else None
        )
        if not self.multimodal_enabled:
            log_vision_tower_skipped(self.vision_tower_cls, hf_config.vision_config)
        self.skipped_checkpoint_prefixes = () if self.multimodal_enabled else self.vision_checkpoint_prefixes
        self.model.language_model = LlamaModel(
            text_config, quant_config, prefix="model.language_model", decoder_layer_cls=Qwen2DecoderLayer
        )
        _use_mrope(self.model.language_model, text_config)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False) or
                                        getattr(text_config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(text_config.vocab_size, text_config.hidden_size, prefix="lm_head")
        if self.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.language_model.embed_tokens)
        self.logits_processor = LogitsProcessor(text_config.vocab_size)

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.embed_tokens(input_ids)

    def embed_multimodal(self, modality: str, data: dict[str, torch.Tensor]) -> torch.Tensor:
        """One item's processed tensors → its embedding rows [num_embeds, hidden_size]."""
        assert self.model.visual is not None, "the vision tower is off (limit_mm_per_prompt 0)"
        if modality == "image":
            pixels, grid = data["pixel_values"], data["image_grid_thw"]
        else:
            pixels, grid = data["pixel_values_videos"], data["video_grid_thw"]
        return self.model.visual(pixels, [[int(x) for x in row] for row in grid.tolist()])

    def embed_multimodal_batch(self, modality: str, datas: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Several items of one modality in one encoder call (each still attends only within
        itself): fewer, larger kernels for a step that starts many images."""
        merged = self.embed_multimodal(modality, {
            key: torch.cat([data[key] for data in datas]) for key in datas[0]
        })
        grid_key = "image_grid_thw" if modality == "image" else "video_grid_thw"
        merge = self.config.vision_config.spatial_merge_size ** 2
        sizes = [int(data[grid_key].prod(-1).sum()) // merge for data in datas]
        return list(merged.split(sizes))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.model.language_model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ["lm_head."] if self.tie_word_embeddings else []
        skip.extend(self.skipped_checkpoint_prefixes)
        renamed = ((_checkpoint_name(name), tensor) for name, tensor in weights)
        return load_weights_by_mapping(self, renamed, self.packed_modules_mapping, skip)


def log_vision_tower_skipped(tower_cls: Any, vision_config: Any) -> int:
    """Logs (and returns) the bytes the unbuilt tower would have taken: measured on a
    skeleton on the meta device, which allocates nothing."""
    with torch.device("meta"):
        tower = tower_cls(vision_config)
    num_bytes = sum(p.numel() for p in tower.parameters()) * torch.get_default_dtype().itemsize
    logger.info(
        "Text only (limit_mm_per_prompt is 0 for every modality): the vision tower is not built "
        "or loaded, saving %.3f GiB of weights.", num_bytes / (1 << 30),
    )
    return num_bytes


def _checkpoint_name(name: str) -> str:
    """Pre-4.52 names (visual.*, model.layers.*) → the current layout."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model.") and not name.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + name[len("model."):]
    return name


def _use_mrope(language_model: LlamaModel, text_config: Any) -> None:
    """Swap the decoder's rope table for M-RoPE (every layer shares the one table)."""
    params = rope_parameters_of(text_config)
    section = params.get("mrope_section") or (getattr(text_config, "rope_scaling", None) or {}).get("mrope_section")
    head_dim = head_dim_of(text_config)
    if section is None:
        section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # 16, 24, 24 at head_dim 128
    rope = MRotaryEmbedding(head_dim, text_config.max_position_embeddings, float(params["rope_theta"]), list(section))
    language_model.rotary_emb = rope
    for layer in language_model.layers:
        layer.self_attn.rotary_emb = rope
