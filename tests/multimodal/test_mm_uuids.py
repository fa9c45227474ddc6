"""vLLM's multi_modal_uuids: the user's ids are the items' keys in the processed-input cache
and in prefix caching (instead of content hashes), an item sent again as None is found by its
uuid, and uuids that do not match the items are a ValueError."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.multimodal.cache import hash_item
from tiny_vl_models import IMAGE_PLACEHOLDER, random_image, tiny_vl_checkpoints  # noqa: F401 (fixture)

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
# 200x200 is 16 placeholder tokens: with the text, the prompt fills two 16-token blocks.
TEXT = "look " + IMAGE_PLACEHOLDER + " and tell me what is in the picture please now"


def _prompt(image, uuids=None, text: str = TEXT) -> dict:
    prompt = {"prompt": text, "multi_modal_data": {"image": image}}
    return prompt if uuids is None else {**prompt, "multi_modal_uuids": {"image": uuids}}


def _features(llm, prompt: dict) -> list:
    return llm.llm_engine.input_processor.process(prompt, GREEDY).mm_inputs.features


def test_uuids_are_the_cache_and_prefix_keys_instead_of_content_hashes(llm):
    processor = llm.llm_engine.input_processor.mm_processor
    stats = llm.llm_engine.scheduler.kv_cache_manager.prefix_cache_stats
    before = processor.num_processed_items
    first = llm.generate(_prompt(random_image(200, 200, 1), ["sku-a"]), GREEDY, use_tqdm=False)[0]
    # Other pixels under the same uuid: not processed again, and the prefix cache hits, so the
    # output is the first image's.
    hits_before = stats.num_hit_tokens
    again = llm.generate(_prompt(random_image(200, 200, 2), ["sku-a"]), GREEDY, use_tqdm=False)[0]
    assert processor.num_processed_items == before + 1
    assert stats.num_hit_tokens - hits_before >= 32 and again.num_cached_tokens >= 32
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    # The same pixels under another uuid are another item: processed, no prefix hit.
    hits_before = stats.num_hit_tokens
    llm.generate(_prompt(random_image(200, 200, 1), ["sku-b"]), GREEDY, use_tqdm=False)
    assert processor.num_processed_items == before + 2
    assert stats.num_hit_tokens == hits_before
    assert [f.identifier for f in _features(llm, _prompt(random_image(200, 200, 3), "sku-a"))] == ["sku-a"]


def test_a_none_uuid_falls_back_to_the_content_hash_and_kwargs_stay_in_the_key(llm):
    images = [random_image(56, 56, 4), random_image(56, 56, 5)]
    two = "a " + IMAGE_PLACEHOLDER + " b " + IMAGE_PLACEHOLDER
    features = _features(llm, _prompt(images, ["sku-c", None], text=two))
    assert [f.identifier for f in features] == ["sku-c", hash_item("image", images[1], {})]
    with_kwargs = {**_prompt(images[0], ["sku-c"], text=two.split(" b ")[0]),
                   "mm_processor_kwargs": {"max_pixels": 28 * 28 * 4}}
    assert _features(llm, with_kwargs)[0].identifier not in ("sku-c", hash_item("image", images[0], {}))


def test_an_item_sent_as_none_reuses_the_cached_item_of_its_uuid(llm):
    processor = llm.llm_engine.input_processor.mm_processor
    image = random_image(200, 200, 6)
    first = llm.generate(_prompt(image, ["sku-d"]), GREEDY, use_tqdm=False)[0]
    before = processor.num_processed_items
    for cached in (_prompt(None, ["sku-d"]), _prompt([None], "sku-d")):
        output = llm.generate(cached, GREEDY, use_tqdm=False)[0]
        assert output.prompt_token_ids == first.prompt_token_ids
        assert output.outputs[0].token_ids == first.outputs[0].token_ids
    assert processor.num_processed_items == before
    with pytest.raises(ValueError, match=r"multi_modal_data\['image'\]\[0\] is None.*uuid 'never-sent'.*cached"):
        llm.generate(_prompt(None, ["never-sent"]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"multi_modal_data\['image'\]\[0\] is None and has no uuid"):
        llm.generate(_prompt([None], [None]), GREEDY, use_tqdm=False)


def test_uuids_and_items_differing_in_number_is_a_value_error_naming_both(llm):
    with pytest.raises(ValueError, match=r"multi_modal_uuids\['image'\] has 2 uuid\(s\).*has 1 image item\(s\)"):
        llm.generate(_prompt(random_image(56, 56, 7), ["sku-e", "sku-f"]), GREEDY, use_tqdm=False)
    with pytest.raises(TypeError, match=r"multi_modal_uuids\['image'\] must be a str or a list"):
        llm.generate(_prompt(random_image(56, 56, 7), [3]), GREEDY, use_tqdm=False)


def test_a_none_item_needs_the_cache(tiny_vl_checkpoints):
    engine = LLM(str(tiny_vl_checkpoints["qwen2_vl"]), dtype="float32", max_model_len=512, mm_processor_cache_gb=0)
    engine.generate(_prompt(random_image(56, 56, 8), ["sku-g"]), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"uuid 'sku-g'.*the cache is off: mm_processor_cache_gb=0"):
        engine.generate(_prompt(None, ["sku-g"]), GREEDY, use_tqdm=False)
    engine.shutdown()
