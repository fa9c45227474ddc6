"""Llama (and Mistral, which has the same layout): pre-norm decoder layers of grouped-query
attention with rope and a SiLU-gated MLP."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from pagedllm.distributed.parallel_state import get_tp_size
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.attention.layer import Attention
from pagedllm.layers.layernorm import RMSNorm
from pagedllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedllm.layers.logits_processor import LogitsProcessor
from pagedllm.layers.quantization.base import QuantizationConfig
from pagedllm.layers.rotary_embedding import RotaryEmbedding, get_rope, rope_parameters_of, scaled_context_length
from pagedllm.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.models.utils import (
    head_dim_of,
    load_weights_by_mapping,
    maybe_prefix,
    sliding_window_of,
)


class LlamaMLP(nn.Module):
    def __init__(
        self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False,
        quant_config: QuantizationConfig | None = None, prefix: str = "",
    ) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r} in config.json is not supported; only 'silu' is.")
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=bias, quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=bias, quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode rows on the GPU: the activation in the gate_up GEMV's epilogue (one launch).
        activated = self.gate_up_proj.forward_silu_and_mul(x)
        if activated is None:
            activated = self.act_fn(self.gate_up_proj(x))
        return self.down_proj(activated)


class LlamaAttention(nn.Module):
    # position_encode is the rope alone (families that normalise q/k first set this False).
    rope_in_projection = True

    def __init__(
        self, config: Any, rotary_emb: RotaryEmbedding, layer_idx: int, qkv_bias: bool,
        o_bias: bool, quant_config: QuantizationConfig | None = None, prefix: str = "",
    ) -> None:
        super().__init__()
        total_num_heads = config.num_attention_heads
        total_num_kv_heads = getattr(config, "num_key_value_heads", None) or total_num_heads
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, total_num_heads, total_num_kv_heads,
            bias=qkv_bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            total_num_heads * self.head_dim, config.hidden_size, bias=o_bias,
            quant_config=quant_config, prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads,
            prefix=f"{prefix}.attn", sliding_window=sliding_window_of(config, layer_idx),
        )

    def position_encode(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rope on q and k; families that normalise q/k per head first override this."""
        return self.rotary_emb(positions, q, k)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        # Decode rows on the GPU: the rope in the qkv GEMV's epilogue (one launch), for families
        # that apply it straight to the projection.
        rotated = None
        if self.rope_in_projection:
            rotated = self.qkv_proj.forward_rotated(hidden_states, self.rotary_emb, positions)
        qkv = rotated if rotated is not None else self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if rotated is None:
            q, k = self.position_encode(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: Any, rotary_emb: RotaryEmbedding, layer_idx: int,
        quant_config: QuantizationConfig | None = None, prefix: str = "",
    ) -> None:
        super().__init__()
        self.self_attn = self.make_attention(
            config, rotary_emb, layer_idx, quant_config, f"{prefix}.self_attn"
        )
        self.mlp = LlamaMLP(
            config.hidden_size, config.intermediate_size, config.hidden_act,
            bias=bool(getattr(config, "mlp_bias", False)), quant_config=quant_config,
            prefix=f"{prefix}.mlp",
        )
        # With several ranks the o and down projections leave their outputs as partial sums:
        # the norm after each all-reduces them, fused with its residual add (one kernel per
        # layer half on CUDA instead of an all-reduce and a norm).
        reduce_in_norm = get_tp_size() > 1
        self.self_attn.o_proj.reduce_results = not reduce_in_norm
        self.mlp.down_proj.reduce_results = not reduce_in_norm
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, all_reduce_before_add=reduce_in_norm)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, all_reduce_before_add=reduce_in_norm
        )

    def fused_activation_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """Each norm's output feeds only the projection after it (see quantized_activation.py)."""
        return [
            (self.input_layernorm, self.self_attn.qkv_proj),
            (self.post_attention_layernorm, self.mlp.gate_up_proj),
        ]

    def make_attention(
        self, config: Any, rotary_emb: RotaryEmbedding, layer_idx: int,
        quant_config: QuantizationConfig | None, prefix: str,
    ) -> nn.Module:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaAttention(config, rotary_emb, layer_idx, bias, bias, quant_config, prefix)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it is added): the add (and
        with several ranks the output's all-reduce) is fused into the next norm."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(
        self, config: Any, quant_config: QuantizationConfig | None = None, prefix: str = "",
        decoder_layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "embed_tokens")
        )
        # One rope table shared by every layer, over the context the rope scaling gives (the
        # engine's max_model_len is derived the same way).
        rope_parameters = rope_parameters_of(config)
        self.rotary_emb = get_rope(
            head_dim_of(config), scaled_context_length(rope_parameters, config.max_position_embeddings),
            rope_parameters,
        )
        self.layers = nn.ModuleList(
            decoder_layer_cls(
                config, self.rotary_emb, i, quant_config, prefix=maybe_prefix(prefix, f"layers.{i}")
            )
            for i in range(config.num_hidden_layers)
        )
        # The last layer's MLP output arrives partial with several ranks (LlamaDecoderLayer).
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, all_reduce_before_add=get_tp_size() > 1)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        if residual is None:
            return self.norm(hidden_states)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    decoder_layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer
    tie_word_embeddings_default = False
    """What a config.json without tie_word_embeddings means for the family."""

    def __init__(
        self, hf_config: Any, quant_config: QuantizationConfig | None = None, prefix: str = ""
    ) -> None:
        super().__init__()
        self.config = hf_config
        self.model = self.make_model(hf_config, quant_config, maybe_prefix(prefix, "model"))
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", self.tie_word_embeddings_default))
        self.lm_head = ParallelLMHead(
            hf_config.vocab_size, hf_config.hidden_size, prefix=maybe_prefix(prefix, "lm_head")
        )
        if self.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = self.make_logits_processor(hf_config)

    def make_model(self, hf_config: Any, quant_config: QuantizationConfig | None, prefix: str) -> nn.Module:
        """The decoder stack; families with another stack override this."""
        return LlamaModel(hf_config, quant_config, prefix=prefix, decoder_layer_cls=self.decoder_layer_cls)

    def make_logits_processor(self, hf_config: Any) -> LogitsProcessor:
        return LogitsProcessor(hf_config.vocab_size)

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [T] (a flat batch) → hidden states [T, hidden_size]."""
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden_size] → [N, vocab_size]."""
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Tied checkpoints may still carry a copy of the embedding as lm_head.weight.
        skip = ("lm_head.",) if self.tie_word_embeddings else ()
        return load_weights_by_mapping(self, self._take_kv_scales(weights), self.packed_modules_mapping, skip)

    def _take_kv_scales(self, weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """Hands an fp8 KV cache's per-layer scales (any of their checkpoint names) to the
        attention layers; passes every other tensor on."""
        for name, tensor in weights:
            suffix, targets = next(((s, t) for s, t in _KV_SCALE_NAMES if name.endswith(s)), ("", ()))
            try:
                attention = self.get_submodule(name[: -len(suffix)] + ".self_attn.attn") if targets else None
            except AttributeError:
                attention = None  # not this model's layer: reported as an unexpected tensor
            if attention is None:
                yield name, tensor
                continue
            for target in targets:
                attention.load_kv_scale(target, tensor)


# Checkpoint names of an fp8 KV cache's per-layer scales (compressed-tensors, ModelOpt /
# AutoFP8, older vLLM, vLLM's own parameter names) → the attention layer's scales they set.
_KV_SCALE_NAMES = (
    (".self_attn.attn.k_scale", ("k_scale",)),
    (".self_attn.attn.v_scale", ("v_scale",)),
    (".self_attn.qkv_proj.k_scale", ("k_scale",)),
    (".self_attn.qkv_proj.v_scale", ("v_scale",)),
    (".self_attn.k_scale", ("k_scale",)),
    (".self_attn.v_scale", ("v_scale",)),
    (".self_attn.k_proj.k_scale", ("k_scale",)),
    (".self_attn.v_proj.v_scale", ("v_scale",)),
    (".self_attn.k_proj.output_scale", ("k_scale",)),
    (".self_attn.v_proj.output_scale", ("v_scale",)),
    (".self_attn.kv_scale", ("k_scale", "v_scale")),
)
