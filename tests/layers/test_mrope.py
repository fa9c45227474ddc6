"""M-RoPE against transformers' Qwen2-VL rotary: [3, T] positions rotate by section, and
equal rows (text, decode) give exactly plain rope, which keeps decode on 1-D positions."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.qwen2_vl import modeling_qwen2_vl as hf

from pagedllm.layers.mrope import MRotaryEmbedding

HEAD_DIM, NUM_HEADS, SECTION = 16, 2, [2, 3, 3]


def test_mrope_matches_transformers_on_3d_positions():
    torch.manual_seed(0)
    config = transformers.Qwen2VLTextConfig(
        hidden_size=HEAD_DIM * NUM_HEADS, num_attention_heads=NUM_HEADS, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": SECTION},
    )
    positions = torch.stack([torch.arange(10), torch.arange(10) // 3, torch.arange(10) % 3 + 4])
    q, k = torch.randn(10, NUM_HEADS * HEAD_DIM), torch.randn(10, NUM_HEADS * HEAD_DIM)
    ours_q, ours_k = MRotaryEmbedding(HEAD_DIM, 256, 10000.0, SECTION)(positions, q, k)
    rotary = hf.Qwen2VLRotaryEmbedding(config)
    cos, sin = rotary(q, positions[:, None, :])  # [1, T, head_dim]
    to_heads = lambda x: x.view(1, 10, NUM_HEADS, HEAD_DIM).transpose(1, 2)  # noqa: E731
    ref_q, ref_k = hf.apply_rotary_pos_emb(to_heads(q), to_heads(k), cos, sin)
    torch.testing.assert_close(ours_q, ref_q.transpose(1, 2).reshape(10, -1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours_k, ref_k.transpose(1, 2).reshape(10, -1), atol=1e-6, rtol=1e-6)


def test_equal_rows_are_plain_rope():
    rope = MRotaryEmbedding(HEAD_DIM, 256, 10000.0, SECTION)
    positions = torch.arange(7) + 30
    q, k = torch.randn(7, 2 * HEAD_DIM), torch.randn(7, 2 * HEAD_DIM)
    three = rope(positions.expand(3, -1), q, k)
    one = rope(positions, q, k)
    torch.testing.assert_close(three[0], one[0], atol=0, rtol=0)
    torch.testing.assert_close(three[1], one[1], atol=0, rtol=0)


def test_sections_must_cover_half_the_head():
    with pytest.raises(ValueError, match="mrope_section"):
        MRotaryEmbedding(HEAD_DIM, 256, 10000.0, [2, 2, 2])


def test_older_configs_with_rope_type_mrope_read_as_default_frequencies():
    from pagedllm.layers.rotary_embedding import rope_parameters_of

    config = transformers.Qwen2VLTextConfig(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    params = rope_parameters_of(config)
    assert params["rope_type"] == "default" and params["mrope_section"] == [16, 24, 24]
