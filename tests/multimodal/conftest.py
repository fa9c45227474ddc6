"""The Qwen2-VL engine the multi-modal test modules share (module scope: one per module).

A module that uses `llm` imports the `tiny_vl_checkpoints` fixture from tiny_vl_models."""

from __future__ import annotations

import pytest

from pagedllm import LLM


@pytest.fixture(scope="module")
def llm(tiny_vl_checkpoints):
    engine = LLM(str(tiny_vl_checkpoints["qwen2_vl"]), dtype="float32", max_model_len=512,
                 limit_mm_per_prompt={"image": 2, "video": 0})
    yield engine
    engine.shutdown()
