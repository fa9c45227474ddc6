"""Gemma 3 with images end to end (LLM.generate through the multi-modal processor and runner)
against transformers on a tiny random fp32 checkpoint with its processor files: prompt
expansion equal to transformers' Gemma3Processor (with and without pan-and-scan), greedy
tokens with one and two images in a batch with a text-only prompt, do_pan_and_scan per
request, and limit 0 leaving the vision weights unread."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_vlm_checkpoints import make_tiny_gemma3_checkpoint, random_image

pytest.importorskip("pagedllm.multimodal.processing", reason="needs the multi-modal infrastructure (mm-qwen)")

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.engine.arg_utils import EngineArgs  # noqa: E402
from pagedllm.multimodal.processing import MultiModalProcessor  # noqa: E402

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 16}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_bpe_tokenizer_dir: Path) -> Path:
    return make_tiny_gemma3_checkpoint(tmp_path_factory.mktemp("gemma3_mm"), tiny_bpe_tokenizer_dir)


@pytest.fixture(scope="module")
def llm(checkpoint: Path) -> LLM:
    return LLM(str(checkpoint), dtype="float32", kv_cache_memory_bytes=1 << 24, max_model_len=512)


@pytest.mark.parametrize("kwargs", [{}, PAN_AND_SCAN], ids=["plain", "pan-and-scan"])
def test_prompt_expansion_equals_transformers_processor(checkpoint: Path, kwargs: dict) -> None:
    hf_processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    text = "the cat <start_of_image> is here"
    image = random_image(96, 24, seed=1)  # wide: pan-and-scan cuts it into crops
    expected = hf_processor(text=text, images=[image], return_tensors="pt", **kwargs)
    model_config = EngineArgs.from_kwargs(str(checkpoint), dtype="float32").create_engine_config().model_config
    processor = MultiModalProcessor(model_config, hf_processor.tokenizer)
    ours = processor.process(hf_processor.tokenizer.encode(text), {"image": image}, kwargs)
    assert ours.prompt_token_ids == expected["input_ids"][0].tolist()
    torch.testing.assert_close(ours.features[0].data["pixel_values"], expected["pixel_values"])
    if kwargs:
        assert expected["pixel_values"].shape[0] > 1


def hf_greedy(checkpoint: Path, token_ids: list[int], images: list) -> list[int]:
    """transformers' greedy tokens for our expanded prompt, with its own image processor."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    input_ids = torch.tensor([token_ids])
    kwargs = {}
    if images:
        image_processor = transformers.AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)
        kwargs["pixel_values"] = image_processor(images=images, return_tensors="pt")["pixel_values"]
        kwargs["token_type_ids"] = (input_ids == model.config.image_token_id).long()
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
            **kwargs,
        )
    return out[0, len(token_ids):].tolist()


def test_greedy_tokens_with_one_and_two_images_match_transformers(llm: LLM, checkpoint: Path) -> None:
    images = [random_image(40, 30, seed=2), random_image(20, 50, seed=3)]
    prompts = [
        {"prompt": "describe <start_of_image> this", "multi_modal_data": {"image": images[0]}},
        {"prompt": "a <start_of_image> and <start_of_image> b", "multi_modal_data": {"image": images}},
        {"prompt": "only text here, no image at all"},
    ]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for output, used in zip(outputs, [images[:1], images, []]):
        assert output.outputs[0].token_ids == hf_greedy(checkpoint, output.prompt_token_ids, used)


def test_pan_and_scan_per_request_adds_crop_tokens_and_matches_transformers(llm: LLM, checkpoint: Path) -> None:
    image = random_image(96, 24, seed=4)
    plain = {"prompt": "see <start_of_image> now", "multi_modal_data": {"image": image}}
    cropped = {**plain, "mm_processor_kwargs": PAN_AND_SCAN}
    out_plain, out_cropped = llm.generate([plain, cropped], GREEDY, use_tqdm=False)
    assert len(out_cropped.prompt_token_ids) > len(out_plain.prompt_token_ids) + 16
    model = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    image_processor = transformers.AutoImageProcessor.from_pretrained(checkpoint, use_fast=False)
    pixel_values = image_processor(images=[image], return_tensors="pt", **PAN_AND_SCAN,
                                   pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)["pixel_values"]
    input_ids = torch.tensor([out_cropped.prompt_token_ids])
    image_token = model.config.image_token_id
    assert int((input_ids == image_token).sum()) == pixel_values.shape[0] * 16
    with torch.no_grad():
        expected = model.generate(
            input_ids=input_ids, pixel_values=pixel_values, token_type_ids=(input_ids == image_token).long(),
            max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    assert out_cropped.outputs[0].token_ids == expected[0, input_ids.shape[1]:].tolist()


def test_image_limit_zero_runs_text_only_without_vision_weights(checkpoint: Path, tmp_path: Path) -> None:
    for item in checkpoint.iterdir():
        shutil.copy(item, tmp_path / item.name)
    weights = load_file(checkpoint / "model.safetensors")
    text_weights = {k: v for k, v in weights.items() if not k.startswith(("vision_tower", "multi_modal_projector"))}
    assert len(text_weights) < len(weights)
    save_file(text_weights, tmp_path / "model.safetensors")
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory_bytes=1 << 24, max_model_len=512,
              limit_mm_per_prompt={"image": 0})
    output = llm.generate({"prompt": "only text here"}, GREEDY, use_tqdm=False)[0]
    assert output.outputs[0].token_ids == hf_greedy(checkpoint, output.prompt_token_ids, [])


def test_chunked_prefill_does_not_split_an_image(llm: LLM, checkpoint: Path) -> None:
    """A 24-token budget would end the first chunk inside the image (~22 tokens from position
    ~3): the scheduler must move the cut before it (requires_unchunked_items), or its first
    tokens would be computed without seeing the rest."""
    image = random_image(40, 30, seed=5)
    prompt = {"prompt": "describe <start_of_image> this", "multi_modal_data": {"image": image}}
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    whole = llm.generate(prompt, params, use_tqdm=False)[0]
    chunked_llm = LLM(str(checkpoint), dtype="float32", kv_cache_memory_bytes=1 << 24, max_model_len=512,
                      max_num_batched_tokens=24, enable_chunked_prefill=True)
    chunked = chunked_llm.generate(prompt, params, use_tqdm=False)[0]
    assert len(whole.prompt_token_ids) > 24
    for a, b in zip(whole.prompt_logprobs[1:], chunked.prompt_logprobs[1:]):
        for token_id, logprob in a.items():
            assert abs(logprob.logprob - b[token_id].logprob) < 1e-4


def test_pan_and_scan_sizes_the_profiled_image(checkpoint: Path) -> None:
    model_config = EngineArgs.from_kwargs(str(checkpoint)).create_engine_config().model_config
    processor = MultiModalProcessor(model_config, tokenizer=None)
    assert processor.dummy_features("image").num_embeds == 16
    assert processor.dummy_features("image", {"do_pan_and_scan": True}).num_embeds == (1 + 4) * 16
    crops_2 = {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": 2}
    assert processor.dummy_features("image", crops_2).num_embeds == (1 + 2) * 16


def test_token_prompts_without_a_tokenizer_place_the_image_tokens(checkpoint: Path) -> None:
    """skip_tokenizer_init (as with dummy weights): the replacement is the image block without
    the surrounding newline tokens, and the image still reaches the model as transformers'."""
    llm = LLM(str(checkpoint), dtype="float32", kv_cache_memory_bytes=1 << 24, max_model_len=512,
              skip_tokenizer_init=True)
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    image = random_image(40, 30, seed=6)
    prompt = {"prompt_token_ids": [40, 41, config.boi_token_index, 42], "multi_modal_data": {"image": image}}
    output = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    image_block = [config.boi_token_index] + [config.image_token_index] * 16 + [config.eoi_token_index]
    assert output.prompt_token_ids == [40, 41, *image_block, 42]
    assert output.outputs[0].token_ids == hf_greedy(checkpoint, output.prompt_token_ids, [image])
