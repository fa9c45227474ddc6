"""Qwen2.5-VL: the Qwen2-VL design with an RMSNorm, SiLU-gated vision encoder that attends
within windows of window_size pixels, except in the `fullatt_block_indexes` blocks, which
attend over the whole image. Tokens are reordered window by window before the blocks and
restored after the merger."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.layernorm import RMSNorm
from pagedllm.layers.linear import ReplicatedLinear
from pagedllm.layers.rotary_embedding import rope_parameters_of
from pagedllm.models.qwen2_vl import (
    PatchMerger,
    Qwen2VLForConditionalGeneration,
    VisionAttention,
    VisionPatchEmbed,
    VisionRotary,
    cu_seqlens_of,
    vision_activation,
)


class Qwen2_5_VisionBlock(nn.Module):
    def __init__(self, vision_config: Any, prefix: str) -> None:
        super().__init__()
        dim, hidden = vision_config.hidden_size, vision_config.intermediate_size
        self.norm1 = RMSNorm(dim, eps=1e-6)
        self.norm2 = RMSNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, vision_config.num_heads, f"{prefix}.attn")
        self.mlp = nn.Module()
        self.mlp.gate_proj = ReplicatedLinear(dim, hidden, bias=True, prefix=f"{prefix}.mlp.gate_proj")
        self.mlp.up_proj = ReplicatedLinear(dim, hidden, bias=True, prefix=f"{prefix}.mlp.up_proj")
        self.mlp.down_proj = ReplicatedLinear(hidden, dim, bias=True, prefix=f"{prefix}.mlp.down_proj")
        self.act = vision_activation(vision_config.hidden_act)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        h = self.norm2(x)
        return x + self.mlp.down_proj(self.act(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


def window_index_of(
    grid_thw: list[list[int]], merge_size: int, window_size: int, patch_size: int
) -> tuple[torch.Tensor, list[int]]:
    """Order of merged-patch groups window by window, and the windows' cumulative lengths in
    patches (transformers' get_vision_window_index)."""
    window_in_groups = window_size // merge_size // patch_size
    unit = merge_size**2
    order, bounds, base = [], [0], 0
    for t, h, w in grid_thw:
        gh, gw = h // merge_size, w // merge_size
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = window_in_groups - gh % window_in_groups, window_in_groups - gw % window_in_groups
        nh, nw = (gh + pad_h) // window_in_groups, (gw + pad_w) // window_in_groups
        padded = F.pad(index, (0, pad_w, 0, pad_h), "constant", -100)
        padded = padded.reshape(t, nh, window_in_groups, nw, window_in_groups).permute(0, 1, 3, 2, 4)
        padded = padded.reshape(t, nh * nw, window_in_groups * window_in_groups)
        lengths = (padded != -100).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        order.append(flat[flat != -100] + base)
        for length in lengths.tolist():
            if length:
                bounds.append(bounds[-1] + length * unit)
        base += t * gh * gw
    return torch.cat(order), bounds


class Qwen2_5_VisionTransformer(nn.Module):
    def __init__(self, vision_config: Any, prefix: str = "") -> None:
        super().__init__()
        self.merge_size = vision_config.spatial_merge_size
        self.patch_size = vision_config.patch_size
        self.window_size = vision_config.window_size
        self.fullatt_block_indexes = set(vision_config.fullatt_block_indexes)
        dim = vision_config.hidden_size
        self.patch_embed = VisionPatchEmbed(
            vision_config.patch_size, vision_config.temporal_patch_size, vision_config.in_channels, dim
        )
        self.rotary_pos_emb = VisionRotary(dim // vision_config.num_heads, rope_parameters_of(vision_config)["rope_theta"])
        self.blocks = nn.ModuleList(
            Qwen2_5_VisionBlock(vision_config, f"{prefix}.blocks.{i}") for i in range(vision_config.depth)
        )
        self.merger = PatchMerger(
            vision_config.out_hidden_size, dim, self.merge_size, RMSNorm(dim, eps=1e-6), f"{prefix}.merger"
        )

    def forward(self, pixels: torch.Tensor, grid_thw: list[list[int]]) -> torch.Tensor:
        unit = self.merge_size**2
        window_index, window_bounds = window_index_of(grid_thw, self.merge_size, self.window_size, self.patch_size)
        window_index = window_index.to(pixels.device)

        def by_window(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(-1, unit, x.shape[-1])[window_index].reshape(-1, x.shape[-1])

        x = by_window(self.patch_embed(pixels))
        cos, sin = self.rotary_pos_emb(grid_thw, self.merge_size)
        cos, sin = by_window(cos), by_window(sin)
        full_bounds = cu_seqlens_of(grid_thw)
        for i, block in enumerate(self.blocks):
            x = block(x, full_bounds if i in self.fullatt_block_indexes else window_bounds, cos, sin)
        return self.merger(x)[torch.argsort(window_index)]


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_tower_cls = Qwen2_5_VisionTransformer
