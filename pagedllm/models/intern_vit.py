"""InternViT, the vision tower of InternVL: a CLS token plus patch embeddings with learned
absolute positions, pre-norm layers (LayerNorm or RMSNorm) with layer-scale factors (ls1,
ls2) on both residual branches, optional q/k RMSNorm over the full width, no final norm.

Parameter names follow InternVL's own checkpoints (`vision_model.*`); internvl.py maps
transformers' InternVLVisionModel names onto them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.distributed.parallel_state import get_tp_size
from pagedllm.layers.layernorm import RMSNorm
from pagedllm.layers.quantization.base import QuantizationConfig
from pagedllm.models.siglip import VisionMLP, VisionSelfAttention


def _norm(norm_type: str, hidden_size: int, eps: float) -> nn.Module:
    if norm_type == "layer_norm":
        return nn.LayerNorm(hidden_size, eps=eps)
    if norm_type == "rms_norm":
        return RMSNorm(hidden_size, eps=eps)
    raise ValueError(f"vision_config norm_type={norm_type!r} is not supported; use 'layer_norm' or 'rms_norm'.")


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


class InternAttention(VisionSelfAttention):
    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        qkv_bias = bool(getattr(config, "qkv_bias", getattr(config, "attention_bias", False)))
        super().__init__(
            config.hidden_size, config.num_attention_heads, qkv_bias, quant_config, prefix, out_proj_name="proj"
        )
        self.qk_normalization = bool(getattr(config, "qk_normalization", getattr(config, "use_qk_norm", False)))
        if self.qk_normalization:
            if get_tp_size() > 1:
                raise ValueError(
                    "InternViT with qk_normalization normalises q and k over all heads; it runs with "
                    "tensor_parallel_size=1 only."
                )
            self.q_norm = RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.k_norm = RMSNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_qkv(x)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.proj(self.attend(q, k, v))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        norm_type = getattr(config, "norm_type", "layer_norm")
        self.norm1 = _norm(norm_type, config.hidden_size, config.layer_norm_eps)
        self.attn = InternAttention(config, quant_config, f"{prefix}.attn")
        self.norm2 = _norm(norm_type, config.hidden_size, config.layer_norm_eps)
        self.mlp = VisionMLP(
            config.hidden_size, config.intermediate_size, config.hidden_act, quant_config, f"{prefix}.mlp"
        )
        self.ls1 = nn.Parameter(torch.empty(config.hidden_size), requires_grad=False)
        self.ls2 = nn.Parameter(torch.empty(config.hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        patch_size = _side(config.patch_size)
        num_patches = (_side(config.image_size) // patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.empty(1, 1, config.hidden_size), requires_grad=False)
        self.patch_embedding = nn.Conv2d(3, config.hidden_size, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = nn.Parameter(torch.empty(1, num_patches + 1, config.hidden_size), requires_grad=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if patches.shape[1] + 1 != self.position_embedding.shape[1]:
            raise ValueError(
                f"pixel_values of {tuple(pixel_values.shape[-2:])} px give {patches.shape[1]} patches; InternViT "
                f"takes tiles of the configured image_size ({self.position_embedding.shape[1] - 1} patches)."
            )
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding


class InternVisionModel(nn.Module):
    """pixel_values [B, 3, S, S] → hidden states [B, 1 + patches, hidden] of layer
    `num_layers` (select_layer -1 runs them all; -n stops n - 1 layers early)."""

    def __init__(
        self, config: Any, quant_config: QuantizationConfig | None = None, prefix: str = "",
        num_layers: int | None = None,
    ) -> None:
        super().__init__()
        self.embeddings = InternVisionEmbeddings(config)
        num_layers = config.num_hidden_layers if num_layers is None else num_layers
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            InternVisionEncoderLayer(config, quant_config, f"{prefix}.encoder.layers.{i}") for i in range(num_layers)
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return x
