"""InternVL against transformers' InternVLForConditionalGeneration on tiny random fp32
checkpoints (Qwen2 language model, 32 px tiles of 4 px patches → 16 tokens per tile): vision
tower + pixel shuffle + projector features, prefill logits and greedy tokens with one and two
multi-tile images, and InternVL2's remote-code layout (vision_model.*, mlp1.*, fused qkv,
llm_config) loaded into the same modules.

Tolerances (fp32, same math in another order): image features 1e-5, logits 1e-4.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch
import transformers
from mm_model_steps import merged_embeddings, paged_greedy
from tiny_models import load_ours
from tiny_vlm_checkpoints import chat_config, randomize_

from pagedllm.models.internvl_config import internvl_chat_config
from pagedllm.models.registry import get_model_class

VOCAB = 384
IMAGE_TOKEN = 380
TOKENS_PER_TILE = 16


def tiny_internvl_config(**vision_overrides: object) -> transformers.InternVLConfig:
    text = dict(
        model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=[32, 32],
        patch_size=[4, 4], attention_bias=True, **vision_overrides,
    )
    return transformers.InternVLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5, vision_feature_layer=-1, architectures=["InternVLForConditionalGeneration"],
    )


def build_pair(config: transformers.InternVLConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    hf_model = transformers.InternVLForConditionalGeneration(config).eval()
    randomize_(hf_model, norm_mean=1.0)
    return hf_model, load_ours("InternVLForConditionalGeneration", config, hf_model)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return build_pair(tiny_internvl_config())


def tiles(num: int, seed: int) -> torch.Tensor:
    return torch.randn(num, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def image_prompt(tiles_per_image: list[int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randint(3, 300, (4,), generator=gen)]
    for n in tiles_per_image:
        image = torch.tensor([377] + [IMAGE_TOKEN] * (n * TOKENS_PER_TILE) + [378])
        parts += [image, torch.randint(3, 300, (3,), generator=gen)]
    return torch.cat(parts)


@pytest.mark.parametrize("variant", ["layer_norm", "rms_norm-qk_norm-select_layer"])
def test_image_features_match_transformers(variant: str) -> None:
    if variant == "layer_norm":
        hf_model, model = build_pair(tiny_internvl_config())
    else:
        config = tiny_internvl_config(norm_type="rms_norm", use_qk_norm=True)
        config.vision_feature_layer = -2  # the last layer unused: its weights are skipped
        hf_model, model = build_pair(config)
        assert len(model.vision_model.encoder.layers) == 2
    pixel_values = tiles(3, 0)
    with torch.no_grad():
        expected = hf_model.model.get_image_features(pixel_values).pooler_output
        ours = [
            model.embed_multimodal("image", {"pixel_values": pixel_values[:1]}),
            model.embed_multimodal("image", {"pixel_values": pixel_values[1:]}),
        ]
        batched = model.embed_multimodal_batch(
            "image", [{"pixel_values": pixel_values[:1]}, {"pixel_values": pixel_values[1:]}]
        )
    assert [t.shape for t in ours] == [(TOKENS_PER_TILE, 64), (2 * TOKENS_PER_TILE, 64)]
    torch.testing.assert_close(torch.cat(ours), expected.flatten(0, 1), atol=1e-5, rtol=0)
    for one, together in zip(ours, batched, strict=True):
        torch.testing.assert_close(together, one, atol=1e-5, rtol=0)


def image_kwargs(pixels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {} if pixels is None else {"pixel_values": pixels}


def check_against_transformers(hf_model, model, make_attn_metadata: Callable) -> None:
    """A one-image prompt (3 tiles), a two-image prompt (1 + 2 tiles) and a text-only prompt in
    one batch: prefill logits within 1e-4 and 8 greedy tokens equal to generate()."""
    prompts = [image_prompt([3], 1), image_prompt([1, 2], 2), torch.randint(3, 300, (7,))]
    pixel_values = [tiles(3, 3), tiles(3, 4), None]
    patches = [[3], [1, 2], None]
    embeds = []
    with torch.no_grad():
        for ids, pixels, counts in zip(prompts, pixel_values, patches):
            rows = []
            for image in (pixels.split(counts) if pixels is not None else []):
                rows.append(model.embed_multimodal("image", {"pixel_values": image}))
            embeds.append(merged_embeddings(model, ids, IMAGE_TOKEN, rows))
    tokens, prefill_logits = paged_greedy(model, prompts, embeds, 8, make_attn_metadata)
    with torch.no_grad():
        expected = torch.cat([
            hf_model(input_ids=ids.unsqueeze(0), **image_kwargs(pixels)).logits[0]
            for ids, pixels in zip(prompts, pixel_values)
        ])
    torch.testing.assert_close(prefill_logits, expected, atol=1e-4, rtol=0)
    for ids, pixels, ours in zip(prompts, pixel_values, tokens):
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=ids.unsqueeze(0), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                **image_kwargs(pixels),
            )
        assert ours == out[0, len(ids):].tolist()


def test_prefill_logits_and_greedy_tokens_match_transformers(pair, make_attn_metadata: Callable) -> None:
    check_against_transformers(*pair, make_attn_metadata)


def remote_code_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' names → InternVL2's own (what its InternVLChatModel checkpoints hold)."""
    out: dict[str, torch.Tensor] = {}
    layer_parts = {
        "attention.projection_layer": "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2",
        "lambda_1": "ls1", "lambda_2": "ls2", "mlp": "mlp",
    }
    for name, tensor in state_dict.items():
        if name.startswith("model.vision_tower.encoder.layer."):
            rest = name[len("model.vision_tower.encoder.layer."):]
            index, sub = rest.split(".", 1)
            if sub.startswith("attention.q_proj"):
                kind = sub.rsplit(".", 1)[1]
                parts = [state_dict[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"vision_model.encoder.layers.{index}.attn.qkv.{kind}"] = torch.cat(parts)
                continue
            if sub.startswith(("attention.k_proj", "attention.v_proj")):
                continue
            for old, new in layer_parts.items():
                if sub.startswith(old):
                    sub = new + sub[len(old):]
                    break
            out[f"vision_model.encoder.layers.{index}.{sub}"] = tensor
            continue
        for old, new in (
            ("model.vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
            ("model.vision_tower.embeddings.patch_embeddings.projection", "vision_model.embeddings.patch_embedding"),
            ("model.vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
            ("model.multi_modal_projector.layer_norm", "mlp1.0"),
            ("model.multi_modal_projector.linear_1", "mlp1.1"),
            ("model.multi_modal_projector.linear_2", "mlp1.3"),
            ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
        ):
            if name.startswith(old):
                out[new + name[len(old):]] = tensor
                break
        else:
            raise AssertionError(name)
    return out


def write_chat_checkpoint_config(path: Path, hf_config: transformers.InternVLConfig) -> None:
    config = {**chat_config(hf_config), "auto_map": {}, "max_dynamic_patch": 6}
    (path / "config.json").write_text(json.dumps(config))
    added = {"added_tokens_decoder": {str(IMAGE_TOKEN): {"content": "<IMG_CONTEXT>", "special": True}}}
    (path / "tokenizer_config.json").write_text(json.dumps(added))


def test_remote_code_chat_checkpoint_matches_transformers(pair, tmp_path, make_attn_metadata: Callable) -> None:
    hf_model, _ = pair
    write_chat_checkpoint_config(tmp_path, hf_model.config)
    config = internvl_chat_config(json.loads((tmp_path / "config.json").read_text()), str(tmp_path))
    assert (config.image_token_id, config.max_dynamic_patch, config.text_config.model_type) == (IMAGE_TOKEN, 6, "qwen2")
    model = get_model_class("InternVLChatModel")(config).eval()
    loaded = model.load_weights(remote_code_layout(hf_model.state_dict()).items())
    assert loaded == set(dict(model.named_parameters()))
    check_against_transformers(hf_model, model, make_attn_metadata)


def test_text_only_build_skips_vision_weights(pair) -> None:
    hf_model, _ = pair
    text_only = SimpleNamespace(is_text_only=True)
    model = get_model_class("InternVLForConditionalGeneration")(tiny_internvl_config(), multimodal_config=text_only)
    loaded = model.load_weights(hf_model.state_dict().items())
    assert loaded == set(dict(model.named_parameters()))
    assert not any(name.startswith(("vision_model", "mlp1")) for name in loaded)
    assert "vision_tower.encoder.layer.0.mlp.fc1.weight".startswith(model.skipped_checkpoint_prefixes)


def test_saved_checkpoint_layout_loads(pair, tmp_path) -> None:
    """save_pretrained writes vision_tower.* / language_model.model.* names (not the in-memory
    model.* ones): both map onto the same parameters."""
    from safetensors.torch import load_file

    hf_model, _ = pair
    hf_model.save_pretrained(tmp_path)
    model = get_model_class("InternVLForConditionalGeneration")(tiny_internvl_config())
    loaded = model.load_weights(load_file(tmp_path / "model.safetensors").items())
    assert loaded == set(dict(model.named_parameters()))
