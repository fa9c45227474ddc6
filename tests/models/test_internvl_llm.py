"""InternVL end to end (LLM.generate through the multi-modal processor and runner) against
transformers' InternVLForConditionalGeneration on tiny random fp32 checkpoints, in both
layouts (transformers' folder with its GotOcr2 image processor, and InternVL2's remote-code
InternVLChatModel folder with the same weights, tiled by our code): greedy tokens with one
and two multi-tile images in a batch with a text-only prompt, and max_dynamic_patch per
request changing the number of image tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tiny_vlm_checkpoints import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_hf_internvl,
    make_tiny_internvl_checkpoint,
    random_image,
)

pytest.importorskip("pagedllm.multimodal.processing", reason="needs the multi-modal infrastructure (mm-qwen)")

from pagedllm import LLM, SamplingParams  # noqa: E402

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
TOKENS_PER_TILE = 16


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_bpe_tokenizer_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("internvl")
    return {
        layout: make_tiny_internvl_checkpoint(root / layout, tiny_bpe_tokenizer_dir, layout=layout)
        for layout in ("hf", "chat")
    }


def reference_pixels(images: list, max_patches: int = 4) -> torch.Tensor:
    processor = transformers.GotOcr2ImageProcessorPil(
        crop_to_patches=True, min_patches=1, max_patches=max_patches, size={"height": 32, "width": 32},
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    )
    return processor(images=images, return_tensors="pt")["pixel_values"]


def hf_greedy(model: torch.nn.Module, token_ids: list[int], images: list, max_patches: int = 4) -> list[int]:
    kwargs = {"pixel_values": reference_pixels(images, max_patches)} if images else {}
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([token_ids]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
            pad_token_id=0, **kwargs,
        )
    return out[0, len(token_ids):].tolist()


@pytest.mark.parametrize("layout", ["hf", "chat"])
def test_greedy_tokens_with_one_and_two_images_match_transformers(checkpoints: dict[str, Path], layout: str) -> None:
    llm = LLM(str(checkpoints[layout]), dtype="float32", kv_cache_memory_bytes=1 << 24, max_model_len=512)
    images = [random_image(100, 40, seed=1), random_image(30, 30, seed=2)]  # 3 x 1 tiles + thumbnail, 1 tile
    prompts = [
        {"prompt": "describe <IMG_CONTEXT> this", "multi_modal_data": {"image": images[0]}},
        {"prompt": "a <IMG_CONTEXT> and <IMG_CONTEXT> b", "multi_modal_data": {"image": images}},
        {"prompt": "only text here, no image at all"},
    ]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    hf_model = load_hf_internvl(checkpoints["hf"])
    image_token = hf_model.config.image_token_id
    assert sum(t == image_token for t in outputs[0].prompt_token_ids) == 4 * TOKENS_PER_TILE
    for output, used in zip(outputs, [images[:1], images, []]):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, output.prompt_token_ids, used)


def test_max_dynamic_patch_per_request_changes_the_tile_count(checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(checkpoints["chat"]), dtype="float32", kv_cache_memory_bytes=1 << 24, max_model_len=512)
    image = random_image(128, 32, seed=3)  # 4 x 1 tiles + thumbnail under the checkpoint's max 4
    prompt = {"prompt": "look <IMG_CONTEXT>", "multi_modal_data": {"image": image}}
    default, single = llm.generate([prompt, {**prompt, "mm_processor_kwargs": {"max_dynamic_patch": 1}}],
                                   GREEDY, use_tqdm=False)
    hf_model = load_hf_internvl(checkpoints["hf"])
    image_token = hf_model.config.image_token_id
    assert sum(t == image_token for t in default.prompt_token_ids) == 5 * TOKENS_PER_TILE
    assert sum(t == image_token for t in single.prompt_token_ids) == 1 * TOKENS_PER_TILE
    assert single.outputs[0].token_ids == hf_greedy(hf_model, single.prompt_token_ids, [image], max_patches=1)


def test_max_dynamic_patch_sizes_the_profiled_image(checkpoints: dict[str, Path]) -> None:
    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.multimodal.processing import MultiModalProcessor

    for layout in ("hf", "chat"):
        model_config = EngineArgs.from_kwargs(str(checkpoints[layout])).create_engine_config().model_config
        processor = MultiModalProcessor(model_config, tokenizer=None)
        largest = processor.dummy_features("image").num_embeds
        smaller = processor.dummy_features("image", {"max_dynamic_patch": 2}).num_embeds
        assert (largest, smaller) == (5 * TOKENS_PER_TILE, 3 * TOKENS_PER_TILE)


def test_token_prompts_without_a_tokenizer_read_the_frame_tokens_from_its_files(checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(checkpoints["chat"]), dtype="float32", kv_cache_memory_bytes=1 << 24, max_model_len=512,
              skip_tokenizer_init=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoints["chat"])
    start, end, context = tokenizer.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"])
    image = random_image(30, 30, seed=7)
    output = llm.generate({"prompt_token_ids": [40, context, 41], "multi_modal_data": {"image": image}},
                          GREEDY, use_tqdm=False)[0]
    assert output.prompt_token_ids == [40, start, *[context] * TOKENS_PER_TILE, end, 41]
    expected = hf_greedy(load_hf_internvl(checkpoints["hf"]), output.prompt_token_ids, [image])
    assert output.outputs[0].token_ids == expected


def test_chat_checkpoint_takes_vllms_image_text_mark(checkpoints: dict[str, Path]) -> None:
    """"<image>" (vLLM's and InternVL2's own prompt mark, several tokens to the tokenizer)
    becomes the one-token <IMG_CONTEXT> mark before tokenizing: the same prompt tokens and
    transformers' greedy tokens, while the output keeps the user's text."""
    llm = LLM(str(checkpoints["chat"]), dtype="float32", kv_cache_memory_bytes=1 << 24, max_model_len=512)
    images = [random_image(100, 40, seed=4), random_image(30, 30, seed=5)]
    marked = [
        {"prompt": "<image>\ndescribe", "multi_modal_data": {"image": images[0]}},
        {"prompt": "a <image> and <image> b", "multi_modal_data": {"image": images}},
    ]
    outputs = llm.generate(marked, GREEDY, use_tqdm=False)
    reference = llm.generate(
        [{**p, "prompt": p["prompt"].replace("<image>", "<IMG_CONTEXT>")} for p in marked], GREEDY, use_tqdm=False
    )
    hf_model = load_hf_internvl(checkpoints["hf"])
    for output, expected, prompt, used in zip(outputs, reference, marked, [images[:1], images]):
        assert output.prompt == prompt["prompt"]
        assert output.prompt_token_ids == expected.prompt_token_ids
        assert output.outputs[0].token_ids == hf_greedy(hf_model, output.prompt_token_ids, used)
    assert sum(t == hf_model.config.image_token_id for t in outputs[1].prompt_token_ids) == 5 * TOKENS_PER_TILE  # 3 x 1 + thumbnail, 1
