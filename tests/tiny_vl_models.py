"""Tiny random-weight Qwen2-VL / Qwen2.5-VL checkpoints with their processor files, built
with transformers (float32, CPU), and transformers' greedy decoding on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
# Small enough for fast tests: images of at most 8 x 8 patches (16 merged tokens).
MIN_PIXELS = 28 * 28
MAX_PIXELS = 28 * 28 * 16


def make_tiny_vl_checkpoint(path: Path, tokenizer_dir: Path, family: str = "qwen2_vl", seed: int = 0) -> Path:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    vocab_size = len(tokenizer) + 4
    text = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        initializer_range=0.2, bos_token_id=0, eos_token_id=1,
    )
    vision = dict(depth=2, num_heads=2, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    if family == "qwen2_vl":
        vision.update(embed_dim=32, mlp_ratio=2, hidden_size=64, hidden_act="quick_gelu")
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:
        vision.update(hidden_size=32, intermediate_size=48, out_hidden_size=64, hidden_act="silu",
                      window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    config = config_class(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )
    config.vision_config.initializer_range = 0.2
    config.architectures = [model_class.__name__]
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # transformers >= 5.2x names the PIL processor ...Pil; before, the plain name is the PIL one.
    processor_class = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    image_processor = processor_class(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    image_processor.save_pretrained(path)
    return path


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def token_type_kwargs(model, input_ids: torch.Tensor) -> dict:
    """transformers >= 5.2x takes mm_token_type_ids (0 text, 1 image, 2 video) for M-RoPE;
    earlier versions find the vision tokens in input_ids themselves."""
    import inspect

    if "mm_token_type_ids" not in inspect.signature(model.forward).parameters:
        return {}
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == model.config.image_token_id] = 1
    types[input_ids == model.config.video_token_id] = 2
    return {"mm_token_type_ids": types}


def hf_greedy_vl(path: Path, token_ids: list[int], mm_data: dict, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens for a prompt whose placeholders our processor expanded;
    `mm_data` holds the processed tensors (pixel_values, image_grid_thw, ...). Also returns
    the log-softmax of the prompt's logits."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    input_ids = torch.tensor([token_ids])
    mm_data = {**mm_data, **token_type_kwargs(model, input_ids)}
    generation = transformers.GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, generation_config=generation, **mm_data)
        logits = model(input_ids=input_ids, **mm_data).logits[0]
    return out[0, len(token_ids):].tolist(), torch.log_softmax(logits.float(), dim=-1)


@pytest.fixture(scope="session")
def tiny_vl_checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_bpe_tokenizer_dir: Path) -> dict[str, Path]:
    """{"qwen2_vl": folder, "qwen2_5_vl": folder}; import this fixture into a test module."""
    root = tmp_path_factory.mktemp("tiny_vl")
    return {
        family: make_tiny_vl_checkpoint(root / family, tiny_bpe_tokenizer_dir, family)
        for family in ("qwen2_vl", "qwen2_5_vl")
    }


def processed_inputs(llm, prompt: str, mm_data: dict, **kwargs):
    """Our processor's expanded token ids and the processed tensors, stacked as transformers
    takes them (pixel_values of every image concatenated, grids stacked)."""
    processor = llm.llm_engine.input_processor.mm_processor
    token_ids = llm.get_tokenizer().encode(prompt)
    mm = processor.process(token_ids, mm_data, kwargs or None)
    tensors: dict[str, list] = {}
    for feature in mm.features:
        for key, value in feature.data.items():
            tensors.setdefault(key, []).append(value)
    return mm.prompt_token_ids, {key: torch.cat(values) for key, values in tensors.items()}
