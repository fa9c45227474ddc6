"""Gemma3ForConditionalGeneration against transformers on a tiny random fp32 checkpoint:
SigLIP + projector features, prefill logits with one and two images (bidirectional attention
inside each image, sliding window 6 shorter than an image's 16 tokens), greedy tokens, and the
text-only build that never reads the vision weights.

Tolerances (fp32, same math in another order): image features 1e-5, logits 1e-4.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import transformers
from mm_model_steps import merged_embeddings, paged_greedy
from tiny_models import load_ours
from tiny_vlm_checkpoints import randomize_

from pagedllm.models.gemma3_mm import image_token_spans
from pagedllm.models.registry import get_model_class

VOCAB = 384
IMAGE_TOKEN = 380
BOI, EOI = 381, 382
MM_TOKENS = 16


def tiny_gemma3_config() -> transformers.Gemma3Config:
    text = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=6, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=512,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=4, vision_use_head=False,
    )
    return transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS, image_token_index=IMAGE_TOKEN,
        boi_token_index=BOI, eoi_token_index=EOI, architectures=["Gemma3ForConditionalGeneration"],
    )


def build_pair(device: str = "cpu") -> tuple[torch.nn.Module, torch.nn.Module]:
    config = tiny_gemma3_config()
    hf_model = transformers.Gemma3ForConditionalGeneration(config).eval()
    randomize_(hf_model, norm_mean=0.0)
    return hf_model, load_ours("Gemma3ForConditionalGeneration", config, hf_model, device)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return build_pair()


def image_prompt(num_images: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randint(3, 300, (5,), generator=gen)]
    for _ in range(num_images):
        parts += [torch.tensor([BOI] + [IMAGE_TOKEN] * MM_TOKENS + [EOI]), torch.randint(3, 300, (4,), generator=gen)]
    return torch.cat(parts)


def pixels(num_images: int, seed: int) -> torch.Tensor:
    return torch.randn(num_images, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def hf_forward_logits(hf_model: torch.nn.Module, ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        kwargs = {}
        if pixel_values is not None:
            kwargs = dict(pixel_values=pixel_values, token_type_ids=(ids == IMAGE_TOKEN).long().unsqueeze(0))
        return hf_model(input_ids=ids.unsqueeze(0), **kwargs).logits[0]


def test_image_features_match_transformers(pair) -> None:
    hf_model, model = pair
    pixel_values = pixels(3, 0)
    with torch.no_grad():
        expected = hf_model.model.get_image_features(pixel_values).pooler_output
        ours = [
            model.embed_multimodal("image", {"pixel_values": pixel_values[:1]}),
            model.embed_multimodal("image", {"pixel_values": pixel_values[1:]}),  # an image and its crop
        ]
        batched = model.embed_multimodal_batch(
            "image", [{"pixel_values": pixel_values[:1]}, {"pixel_values": pixel_values[1:]}]
        )
    assert [t.shape for t in ours] == [(MM_TOKENS, 64), (2 * MM_TOKENS, 64)]
    torch.testing.assert_close(torch.cat(ours), expected.flatten(0, 1), atol=1e-5, rtol=0)
    for one, together in zip(ours, batched, strict=True):
        torch.testing.assert_close(together, one, atol=1e-5, rtol=0)


def test_image_token_spans_follow_runs_and_requests() -> None:
    ids = torch.tensor([1, IMAGE_TOKEN, IMAGE_TOKEN, 2, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 5])
    positions = torch.tensor([7, 8, 9, 10, 11, 0, 1, 2])
    assert image_token_spans(ids, positions, IMAGE_TOKEN, [0, 5, 8]) == [[(8, 10), (11, 12)], [(0, 2)]]
    assert image_token_spans(ids[:1], positions[:1], IMAGE_TOKEN, [0, 1]) is None


def test_prefill_logits_and_greedy_tokens_match_transformers(pair, make_attn_metadata: Callable) -> None:
    check_against_transformers(*pair, make_attn_metadata, "cpu", 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_image_prefill_on_cuda_takes_the_bidirectional_fallback_and_matches_transformers(
    make_attn_metadata: Callable,
) -> None:
    """The Triton backend hands steps with image spans to the reference attention; decode
    steps stay on the kernels. fp32; 2e-3 allows for TF32 in the vision tower and kernels."""
    hf_model, model = build_pair("cuda")
    check_against_transformers(hf_model, model, make_attn_metadata, "cuda", 2e-3)


def check_against_transformers(hf_model, model, make_attn_metadata: Callable, device: str, atol: float) -> None:
    """One batch: a one-image prompt, a two-image prompt and a text-only prompt."""
    prompts = [image_prompt(1, 1), image_prompt(2, 2), torch.randint(3, 300, (9,))]
    images = [pixels(1, 3), pixels(2, 4), None]
    embeds = []
    with torch.no_grad():
        for ids, pixel_values in zip(prompts, images):
            rows = [] if pixel_values is None else [
                model.embed_multimodal("image", {"pixel_values": image[None].to(device)}) for image in pixel_values
            ]
            embeds.append(merged_embeddings(model, ids.to(device), IMAGE_TOKEN, rows))
    tokens, prefill_logits = paged_greedy(model, [p.to(device) for p in prompts], embeds, 8, make_attn_metadata, device)
    expected_logits = torch.cat([hf_forward_logits(hf_model, ids, px) for ids, px in zip(prompts, images)])
    torch.testing.assert_close(prefill_logits.cpu(), expected_logits, atol=atol, rtol=0)
    for ids, pixel_values, ours in zip(prompts, images, tokens):
        kwargs = {}
        if pixel_values is not None:
            kwargs = dict(pixel_values=pixel_values, token_type_ids=(ids == IMAGE_TOKEN).long().unsqueeze(0))
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=ids.unsqueeze(0), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                **kwargs,
            )
        assert ours == out[0, len(ids):].tolist()


def test_bidirectional_image_attention_changes_the_prefill(pair, make_attn_metadata: Callable) -> None:
    """Guards the test above: with image tokens seen causally only, logits move away."""
    hf_model, model = pair
    ids, pixel_values = image_prompt(1, 1), pixels(1, 3)
    causal = hf_model(input_ids=ids.unsqueeze(0), pixel_values=pixel_values).logits[0]
    bidirectional = hf_forward_logits(hf_model, ids, pixel_values)
    assert (causal - bidirectional).abs().max() > 1e-2


def test_text_only_build_skips_vision_weights(pair) -> None:
    hf_model, _ = pair
    text_only = SimpleNamespace(is_text_only=True)
    model = get_model_class("Gemma3ForConditionalGeneration")(tiny_gemma3_config(), multimodal_config=text_only)
    weights = hf_model.state_dict()
    loaded = model.load_weights(weights.items())
    assert loaded == set(dict(model.named_parameters()))
    assert not any(name.startswith(("vision_tower", "multi_modal_projector")) for name in loaded)
    assert "model.vision_tower.embeddings.patch_embedding.weight".startswith(model.skipped_checkpoint_prefixes)


def test_saved_checkpoint_layout_loads(pair, tmp_path) -> None:
    """save_pretrained writes language_model.model.* / vision_tower.* names (hub checkpoints
    add vision_tower.vision_model.*): all map onto the same parameters."""
    from safetensors.torch import load_file

    hf_model, _ = pair
    hf_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    hub_style = {name.replace("vision_tower.", "vision_tower.vision_model."): t for name, t in weights.items()}
    for checkpoint in (weights, hub_style):
        model = get_model_class("Gemma3ForConditionalGeneration")(tiny_gemma3_config())
        assert model.load_weights(checkpoint.items()) == set(dict(model.named_parameters()))
