"""SigLIP vision encoder (the vision tower of Gemma 3): patch convolution plus learned
position embeddings, pre-norm transformer layers with full, non-causal attention, and a final
LayerNorm. Images are encoded in batches of equal size; attention is plain torch SDPA over
this rank's heads (no KV cache: every image is one whole sequence)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedllm.layers.quantization.base import QuantizationConfig

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def vision_activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"vision_config hidden_act={name!r} is not supported; use one of {sorted(_ACTIVATIONS)}."
        )
    return _ACTIVATIONS[name]


class VisionMLP(nn.Module):
    """fc1 → activation → fc2, split by intermediate features across ranks."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, hidden_act: str,
        quant_config: QuantizationConfig | None = None, prefix: str = "",
    ) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(
            hidden_size, intermediate_size, bias=True, quant_config=quant_config, prefix=f"{prefix}.fc1"
        )
        self.fc2 = RowParallelLinear(
            intermediate_size, hidden_size, bias=True, quant_config=quant_config, prefix=f"{prefix}.fc2"
        )
        self.act = vision_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionSelfAttention(nn.Module):
    """Full bidirectional multi-head attention over each image's patches: [B, N, C] → [B, N, C]."""

    def __init__(
        self, hidden_size: int, num_heads: int, qkv_bias: bool = True,
        quant_config: QuantizationConfig | None = None, prefix: str = "", out_proj_name: str = "out_proj",
    ) -> None:
        super().__init__()
        self.head_dim = hidden_size // num_heads
        self.qkv_proj = QKVParallelLinear(
            hidden_size, self.head_dim, num_heads, num_heads, bias=qkv_bias,
            quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.num_heads = self.qkv_proj.num_heads
        self.scale = self.head_dim**-0.5
        self.out_proj_name = out_proj_name
        self.add_module(out_proj_name, RowParallelLinear(
            hidden_size, hidden_size, bias=True, quant_config=quant_config, prefix=f"{prefix}.{out_proj_name}"
        ))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [B, N, heads * head_dim] → [B, N, heads * head_dim]; families that normalise
        q/k first override forward, not this."""
        batch, num_tokens, _ = q.shape
        q, k, v = (t.view(batch, num_tokens, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return out.transpose(1, 2).reshape(batch, num_tokens, -1)

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = self.num_heads * self.head_dim
        return self.qkv_proj(x).split([size, size, size], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.out_proj_name)(self.attend(*self.split_qkv(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionSelfAttention(
            config.hidden_size, config.num_attention_heads, quant_config=quant_config, prefix=f"{prefix}.self_attn"
        )
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(
            config.hidden_size, config.intermediate_size, config.hidden_act, quant_config, f"{prefix}.mlp"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        num_patches = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Embedding(num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight


class SiglipEncoder(nn.Module):
    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            SiglipEncoderLayer(config, quant_config, f"{prefix}.layers.{i}") for i in range(config.num_hidden_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionModel(nn.Module):
    """pixel_values [B, 3, image_size, image_size] → last hidden states [B, num_patches, hidden]
    (after post_layernorm; the attention-pooling head, unused by Gemma 3, is not built)."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}

    def __init__(self, config: Any, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        if getattr(config, "vision_use_head", False):
            raise ValueError(
                "vision_config.vision_use_head=true is not supported: pagedllm's SigLIP tower returns "
                "patch features for a language model (set vision_use_head to false)."
            )
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config, quant_config, f"{prefix}.encoder")
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
