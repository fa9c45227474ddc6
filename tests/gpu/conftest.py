"""Fixtures of the GPU tests."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def qwen3_0_6b_folder(tmp_path):
    """Qwen3-0.6B's config.json alone: real sizes for load_format="dummy"."""
    folder = tmp_path / "qwen3"
    folder.mkdir()
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder
