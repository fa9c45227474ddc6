"""The processed-input cache: keyed by content and kwargs, bounded in bytes, LRU eviction."""

from __future__ import annotations

import pytest
import torch

from pagedllm import envs
from pagedllm.multimodal.cache import ProcessedInputCache, hash_item
from pagedllm.multimodal.processing import ProcessedItem
from tiny_vl_models import random_image, tiny_vl_checkpoints  # noqa: F401 (fixture)


def _item(num_floats: int) -> ProcessedItem:
    return ProcessedItem(data={"pixel_values": torch.zeros(num_floats)}, num_embeds=1)


def test_cache_never_grows_past_its_bound_and_evicts_least_recently_used():
    cache = ProcessedInputCache(capacity_bytes=3 * 400)
    for key in "abc":
        cache.put(key, _item(100))  # 400 bytes each
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", _item(100))
    assert cache.num_bytes <= cache.capacity_bytes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    cache.put("huge", _item(10_000))  # larger than the bound: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3
    assert cache.stats.evictions == 1


def test_item_hash_depends_on_pixels_and_kwargs_only():
    a, same, other = random_image(30, 30, 1), random_image(30, 30, 1), random_image(30, 30, 2)
    assert hash_item("image", a, {}) == hash_item("image", same, {})
    assert hash_item("image", a, {}) != hash_item("image", other, {})
    assert hash_item("image", a, {"max_pixels": 1000}) != hash_item("image", a, {})
    assert hash_item("image", [a, a], {}) != hash_item("video", [a, a], {})
    with pytest.raises(TypeError, match="PIL image"):
        hash_item("image", object(), {})


def test_cache_size_env_var_and_its_vllm_alias(monkeypatch):
    monkeypatch.delenv("PAGEDLLM_MM_INPUT_CACHE_GIB", raising=False)
    monkeypatch.delenv("VLLM_MM_INPUT_CACHE_GIB", raising=False)
    assert envs.mm_input_cache_bytes() == 4 << 30
    monkeypatch.setenv("VLLM_MM_INPUT_CACHE_GIB", "0.5")
    assert envs.mm_input_cache_bytes() == 1 << 29
    monkeypatch.setenv("PAGEDLLM_MM_INPUT_CACHE_GIB", "0")
    assert envs.mm_input_cache_bytes() == 0
    monkeypatch.setenv("PAGEDLLM_MM_INPUT_CACHE_GIB", "lots")
    with pytest.raises(ValueError, match="PAGEDLLM_MM_INPUT_CACHE_GIB"):
        envs.mm_input_cache_bytes()


def test_cli_takes_limits_as_json_or_pairs_and_processor_kwargs_as_json():
    import argparse

    from pagedllm.engine.arg_utils import EngineArgs

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli_args(parser.parse_args(
        ["--limit-mm-per-prompt", '{"image": 3, "video": 0}', "--mm-processor-kwargs", '{"max_pixels": 1000}']
    ))
    assert args.limit_mm_per_prompt == {"image": 3, "video": 0}
    assert args.mm_processor_kwargs == {"max_pixels": 1000}
    pairs = EngineArgs.from_cli_args(parser.parse_args(["--limit-mm-per-prompt", "image=2,video=1"]))
    assert pairs.limit_mm_per_prompt == {"image": 2, "video": 1}


def test_mm_processor_cache_gb_sets_the_bound_over_the_env_var(tiny_vl_checkpoints, monkeypatch):
    from pagedllm.engine.arg_utils import EngineArgs

    def cache_bytes(**kwargs) -> int:
        config = EngineArgs.from_kwargs(str(tiny_vl_checkpoints["qwen2_vl"]), **kwargs).create_engine_config()
        return config.model_config.multimodal_config.input_cache_bytes

    monkeypatch.setenv("PAGEDLLM_MM_INPUT_CACHE_GIB", "2")
    assert cache_bytes() == 2 << 30
    assert cache_bytes(mm_processor_cache_gb=0.5) == 1 << 29
    assert cache_bytes(mm_processor_cache_gb=0) == 0
    with pytest.raises(ValueError, match=r"mm_processor_cache_gb must be a number of GiB >= 0.*-1"):
        cache_bytes(mm_processor_cache_gb=-1)


def test_mm_processor_cache_gb_zero_turns_the_cache_off(tiny_vl_checkpoints, monkeypatch):
    from pagedllm import LLM, SamplingParams

    monkeypatch.setenv("PAGEDLLM_MM_INPUT_CACHE_GIB", "4")
    engine = LLM(str(tiny_vl_checkpoints["qwen2_vl"]), dtype="float32", max_model_len=512, mm_processor_cache_gb=0)
    processor = engine.llm_engine.input_processor.mm_processor
    prompt = {"prompt": "look <|vision_start|><|image_pad|><|vision_end|>",
              "multi_modal_data": {"image": random_image(56, 56, 3)}}
    for _ in range(2):
        engine.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)
    assert processor.num_processed_items == 2 and len(processor.cache) == 0
    engine.shutdown()


def test_cli_flag_mm_processor_cache_gb():
    import argparse

    from pagedllm.engine.arg_utils import EngineArgs

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args(["--mm-processor-cache-gb", "0.25"])).mm_processor_cache_gb == 0.25
    assert EngineArgs.from_cli_args(parser.parse_args([])).mm_processor_cache_gb is None
