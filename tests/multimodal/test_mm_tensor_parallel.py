"""An image prompt across two CPU ranks (mp executor, gloo): the items travel to every rank,
the vision tower is replicated, and the tokens equal one rank's."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from tiny_vl_models import IMAGE_PLACEHOLDER, random_image, tiny_vl_checkpoints  # noqa: F401 (fixture)


@pytest.mark.slow
def test_image_prompt_with_two_ranks_equals_one(tiny_vl_checkpoints):
    path = str(tiny_vl_checkpoints["qwen2_5_vl"])
    prompt = {"prompt": f"a {IMAGE_PLACEHOLDER} b", "multi_modal_data": {"image": random_image(60, 90, 1)}}
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    one = LLM(path, dtype="float32", max_model_len=256)
    expected = one.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    one.shutdown()
    two = LLM(path, dtype="float32", max_model_len=256, tensor_parallel_size=2, distributed_executor_backend="mp")
    assert two.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == expected
    two.shutdown()
