"""Rope against transformers' Llama rotary embedding, for each supported rope type; and the
reading of rope settings from new (rope_parameters) and old (rope_theta + rope_scaling)
configs. fp32 results must match to 1e-6; bf16 ones exactly (same casts, same op order)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from pagedllm.layers.rotary_embedding import get_rope, rope_parameters_of

HEAD, HEADS, KV_HEADS, MAX_POS = 16, 4, 2, 512

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope_type", list(ROPES))
def test_rope_matches_transformers(rope_type: str, dtype: torch.dtype) -> None:
    config = LlamaConfig(hidden_size=HEAD * HEADS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=MAX_POS, rope_parameters=dict(ROPES[rope_type]))
    rope = get_rope(HEAD, MAX_POS, rope_parameters_of(config))
    hf_rope = LlamaRotaryEmbedding(config)
    torch.manual_seed(0)
    positions = torch.randint(0, MAX_POS, (9,))
    q = torch.randn(9, HEADS * HEAD, dtype=dtype)
    k = torch.randn(9, KV_HEADS * HEAD, dtype=dtype)
    cos, sin = hf_rope(q, positions.unsqueeze(0))
    hf_q, hf_k = apply_rotary_pos_emb(q.view(1, 9, HEADS, HEAD), k.view(1, 9, KV_HEADS, HEAD), cos, sin, unsqueeze_dim=2)
    out_q, out_k = rope(positions, q, k)
    atol = 1e-6 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(out_q, hf_q.reshape(9, -1), atol=atol, rtol=0)
    torch.testing.assert_close(out_k, hf_k.reshape(9, -1), atol=atol, rtol=0)


def test_partial_rotary_leaves_the_tail_of_each_head_untouched() -> None:
    rope = get_rope(HEAD, 32, {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    full = get_rope(HEAD // 2, 32, {"rope_type": "default", "rope_theta": 10000.0})
    positions = torch.arange(5)
    q, k = torch.randn(5, HEADS * HEAD), torch.randn(5, KV_HEADS * HEAD)
    out_q, _ = rope(positions, q, k)
    ref_q, _ = full(positions, q.view(5, HEADS, HEAD)[..., : HEAD // 2].reshape(5, -1), k.view(5, KV_HEADS, HEAD)[..., : HEAD // 2].reshape(5, -1))
    torch.testing.assert_close(out_q.view(5, HEADS, HEAD)[..., : HEAD // 2], ref_q.view(5, HEADS, -1))
    assert torch.equal(out_q.view(5, HEADS, HEAD)[..., HEAD // 2 :], q.view(5, HEADS, HEAD)[..., HEAD // 2 :])


def test_old_style_config_with_rope_theta_and_rope_scaling() -> None:
    old = SimpleNamespace(rope_theta=500000.0, max_position_embeddings=4096,
                          rope_scaling={"type": "linear", "factor": 2.0})
    assert rope_parameters_of(old) == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    plain = SimpleNamespace(rope_theta=1e6, rope_scaling=None, max_position_embeddings=4096)
    assert rope_parameters_of(plain) == {"rope_type": "default", "rope_theta": 1e6}
    llama3 = SimpleNamespace(rope_theta=5e5, max_position_embeddings=8192,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    assert rope_parameters_of(llama3)["original_max_position_embeddings"] == 8192


def test_per_layer_type_rope_parameters_need_a_layer_type() -> None:
    config = SimpleNamespace(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    })
    assert rope_parameters_of(config, "sliding_attention")["rope_theta"] == 1e4
    with pytest.raises(ValueError, match="full_attention"):
        rope_parameters_of(config)


def test_unsupported_rope_type_lists_supported_ones() -> None:
    with pytest.raises(ValueError, match="rope_type='dynamic'.*default, linear, llama3, yarn"):
        get_rope(HEAD, 32, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
