"""Qwen3 (dense): the Llama layout with an explicit head_dim and an RMSNorm over each query
and key head (q_norm, k_norm) before rope; no projection biases by default."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.layers.layernorm import RMSNorm
from pagedllm.layers.quantization.base import QuantizationConfig
from pagedllm.layers.rotary_embedding import RotaryEmbedding
from pagedllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    # q_norm and k_norm come between the projection and the rope.
    rope_in_projection = False

    def __init__(
        self, config: Any, rotary_emb: RotaryEmbedding, layer_idx: int,
        quant_config: QuantizationConfig | None = None, prefix: str = "",
    ) -> None:
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, rotary_emb, layer_idx, bias, bias, quant_config, prefix)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def position_encode(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens = q.shape[0]
        q = self.q_norm(q.reshape(num_tokens, -1, self.head_dim)).flatten(1)
        k = self.k_norm(k.reshape(num_tokens, -1, self.head_dim)).flatten(1)
        return self.rotary_emb(positions, q, k)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    def make_attention(
        self, config: Any, rotary_emb: RotaryEmbedding, layer_idx: int,
        quant_config: QuantizationConfig | None, prefix: str,
    ) -> nn.Module:
        return Qwen3Attention(config, rotary_emb, layer_idx, quant_config, prefix)


class Qwen3ForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = Qwen3DecoderLayer
