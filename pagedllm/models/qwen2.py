"""Qwen2 / Qwen2.5: the Llama layout with biases on the q, k and v projections (not on o)."""

from __future__ import annotations

from typing import Any

from torch import nn

from pagedllm.layers.quantization.base import QuantizationConfig
from pagedllm.layers.rotary_embedding import RotaryEmbedding
from pagedllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen2DecoderLayer(LlamaDecoderLayer):
    def make_attention(
        self, config: Any, rotary_emb: RotaryEmbedding, layer_idx: int,
        quant_config: QuantizationConfig | None, prefix: str,
    ) -> nn.Module:
        return LlamaAttention(
            config, rotary_emb, layer_idx, qkv_bias=True, o_bias=False,
            quant_config=quant_config, prefix=prefix,
        )


class Qwen2ForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = Qwen2DecoderLayer
