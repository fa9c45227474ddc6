"""Gemma 3 (text): pre- and post-norms around both attention and MLP, RMSNorm scaling by
(1 + weight), q/k norms, a GELU-tanh gated MLP, embeddings scaled by sqrt(hidden_size), and
five sliding-window layers per global one, each kind with its own rope table."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.layers.activation import GeluTanhAndMul
from pagedllm.layers.attention.layer import Attention
from pagedllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedllm.layers.logits_processor import LogitsProcessor
from pagedllm.layers.quantization.base import QuantizationConfig
from pagedllm.layers.rotary_embedding import RotaryEmbedding, get_rope, rope_parameters_of
from pagedllm.layers.vocab_embedding import VocabParallelEmbedding
from pagedllm.models.llama import LlamaForCausalLM
from pagedllm.models.utils import head_dim_of, maybe_prefix

_SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), all in float32 and cast back at the end, as transformers'
    Gemma3RMSNorm computes it (the checkpoint stores weight centred on 0)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


def layer_types_of(config: Any) -> list[str]:
    """Each layer's kind, "sliding_attention" or "full_attention"; old config.json files
    give only `sliding_window_pattern` (every n-th layer is global)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return list(layer_types)
    pattern = int(getattr(config, "sliding_window_pattern", 6))
    return [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(config.num_hidden_layers)
    ]


def gemma3_rope_parameters(config: Any, layer_type: str) -> dict[str, Any]:
    """Local layers use `rope_local_base_freq` without scaling, global ones `rope_theta`
    with the config's scaling; transformers 5 stores both under rope_parameters[layer_type]."""
    params = getattr(config, "rope_parameters", None) or {}
    if params and all(isinstance(value, dict) for value in params.values()):
        return rope_parameters_of(config, layer_type)
    if layer_type == "sliding_attention":
        return {"rope_type": "default", "rope_theta": float(getattr(config, "rope_local_base_freq", 10000.0))}
    return rope_parameters_of(config)


class Gemma3MLP(nn.Module):
    def __init__(
        self, config: Any, quant_config: QuantizationConfig | None = None, prefix: str = ""
    ) -> None:
        super().__init__()
        activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        if activation not in _SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hidden_activation={activation!r} in config.json is not supported for Gemma 3; "
                f"use one of {_SUPPORTED_ACTIVATIONS}."
            )
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=False,
            quant_config=quant_config, prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=False, quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = GeluTanhAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Gemma3Attention(nn.Module):
    def __init__(
        self, config: Any, rotary_emb: RotaryEmbedding, layer_idx: int,
        quant_config: QuantizationConfig | None = None, prefix: str = "",
    ) -> None:
        super().__init__()
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError(
                f"attn_logit_softcapping={config.attn_logit_softcapping} in config.json is not "
                "supported (no Gemma 3 checkpoint sets it); set it to null."
            )
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(
                "use_bidirectional_attention=true in config.json (an embedding model) is not "
                "supported; pagedllm runs causal Gemma 3 models (use_bidirectional_attention=false)."
            )
        self.head_dim = head_dim_of(config)
        bias = bool(getattr(config, "attention_bias", False))
        total_num_heads = config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, total_num_heads, config.num_key_value_heads,
            bias=bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.q_size = self.qkv_proj.num_heads * self.head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            total_num_heads * self.head_dim, config.hidden_size, bias=bias,
            quant_config=quant_config, prefix=f"{prefix}.o_proj",
        )
        self.q_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            self.qkv_proj.num_heads, self.head_dim, float(config.query_pre_attn_scalar) ** -0.5,
            self.qkv_proj.num_kv_heads, prefix=f"{prefix}.attn",
            sliding_window=config.sliding_window if layer_types_of(config)[layer_idx] == "sliding_attention" else None,
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        num_tokens = q.shape[0]
        q = self.q_norm(q.reshape(num_tokens, -1, self.head_dim)).flatten(1)
        k = self.k_norm(k.reshape(num_tokens, -1, self.head_dim)).flatten(1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class Gemma3DecoderLayer(nn.Module):
    def __init__(
        self, config: Any, rotary_emb: RotaryEmbedding, layer_idx: int,
        quant_config: QuantizationConfig | None = None, prefix: str = "",
    ) -> None:
        super().__init__()
        self.self_attn = Gemma3Attention(config, rotary_emb, layer_idx, quant_config, f"{prefix}.self_attn")
        self.mlp = Gemma3MLP(config, quant_config, f"{prefix}.mlp")
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        attn_out = self.self_attn(positions, self.input_layernorm(hidden_states))
        hidden_states = hidden_states + self.post_attention_layernorm(attn_out)
        mlp_out = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        return hidden_states + self.post_feedforward_layernorm(mlp_out)


class Gemma3TextModel(nn.Module):
    def __init__(
        self, config: Any, quant_config: QuantizationConfig | None = None, prefix: str = ""
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "embed_tokens")
        )
        self.embed_scale = config.hidden_size**0.5
        layer_types = layer_types_of(config)
        # One rope table per layer kind, shared by the layers of that kind.
        head_dim = head_dim_of(config)
        ropes = {
            kind: get_rope(head_dim, config.max_position_embeddings, gemma3_rope_parameters(config, kind))
            for kind in sorted(set(layer_types))
        }
        self.rotary_embs = nn.ModuleDict(ropes)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(
                config, ropes[layer_types[i]], i, quant_config, prefix=maybe_prefix(prefix, f"layers.{i}")
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings times sqrt(hidden_size), the factor rounded to the weights' dtype
        first as transformers does (bf16 turns sqrt(3072) into 55.5)."""
        embeds = self.embed_tokens(input_ids)
        return embeds * torch.tensor(self.embed_scale, dtype=embeds.dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed(input_ids)
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states)
        return self.norm(hidden_states)


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Llama's wiring of embedding, decoder and LM head around Gemma 3's decoder stack, with
    tied embeddings by default and the final logit soft cap."""

    tie_word_embeddings_default = True

    def make_model(self, hf_config: Any, quant_config: QuantizationConfig | None, prefix: str) -> nn.Module:
        return Gemma3TextModel(hf_config, quant_config, prefix=prefix)

    def make_logits_processor(self, hf_config: Any) -> LogitsProcessor:
        return LogitsProcessor(hf_config.vocab_size, soft_cap=getattr(hf_config, "final_logit_softcapping", None))

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Scaled token embeddings: what forward() uses when inputs_embeds is None."""
        return self.model.embed(input_ids)
