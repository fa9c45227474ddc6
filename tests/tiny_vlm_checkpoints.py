"""Tiny random-weight Gemma 3 and InternVL checkpoints with their processor/tokenizer files,
built with transformers (float32, CPU): images are 32 px (Gemma 3: 16 tokens per image or
crop; InternVL: 32 px tiles of 4 px patches, 16 tokens per tile). InternVL comes in both
layouts: transformers' InternVLForConditionalGeneration and InternVL2's remote-code
InternVLChatModel (vision_model.*, mlp1.*, fused qkv, llm_config)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
INTERNVL_TOKENS = {
    "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def randomize_(model: torch.nn.Module, norm_mean: float, seed: int = 0) -> None:
    """Random weights everywhere (norms around norm_mean: 0 for Gemma's (1 + w) norms, 1 for
    the others), large enough that greedy choices are not near-ties."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.normal_(norm_mean, 0.2)
            else:
                param.normal_(0.0, 0.1)


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def make_tiny_gemma3_checkpoint(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens=GEMMA3_TOKENS)
    text = dict(
        vocab_size=len(tokenizer) + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=6, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=4, vision_use_head=False)
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=16, image_token_index=tokenizer.image_token_id,
        boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
        architectures=["Gemma3ForConditionalGeneration"],
    )
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    randomize_(model, norm_mean=0.0, seed=seed)
    model.save_pretrained(path)
    processor_class = getattr(transformers, "Gemma3ImageProcessorPil", None) or transformers.Gemma3ImageProcessor
    image_processor = processor_class(size={"height": 32, "width": 32})
    transformers.Gemma3Processor(image_processor, tokenizer, image_seq_length=16).save_pretrained(path)
    return path


def _internvl_config(tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.InternVLConfig:
    text = dict(
        model_type="qwen2", vocab_size=len(tokenizer) + 4, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[32, 32], patch_size=[4, 4], attention_bias=True)
    return transformers.InternVLConfig(
        text_config=text, vision_config=vision, image_token_id=tokenizer.context_image_token_id,
        image_seq_length=16, downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=False,
        architectures=["InternVLForConditionalGeneration"],
    )


def make_tiny_internvl_checkpoint(path: Path, tokenizer_dir: Path, layout: str = "hf", seed: int = 0) -> Path:
    """layout "hf": transformers' InternVLForConditionalGeneration folder with its GotOcr2 image
    processor (at most 4 tiles); "chat": the same weights as InternVL2's InternVLChatModel."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens=INTERNVL_TOKENS)
    model = transformers.InternVLForConditionalGeneration(_internvl_config(tokenizer)).eval()
    randomize_(model, norm_mean=1.0, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    if layout == "hf":
        model.save_pretrained(path)
        (getattr(transformers, "GotOcr2ImageProcessorPil", None) or transformers.GotOcr2ImageProcessor)(
            size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4,
            image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
        ).save_pretrained(path)
        return path
    save_file({k: v.contiguous() for k, v in chat_layout(model.state_dict()).items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(chat_config(model.config)))
    return path


def load_hf_internvl(path: Path) -> torch.nn.Module:
    """transformers' model for either layout (the chat one rebuilt from the same seed)."""
    return transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def chat_config(config: transformers.InternVLConfig) -> dict:
    vision = config.vision_config
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "torch_dtype": "float32",
        "llm_config": {**config.text_config.to_dict(), "architectures": ["Qwen2ForCausalLM"]},
        "vision_config": {
            "hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
            "num_hidden_layers": vision.num_hidden_layers, "num_attention_heads": vision.num_attention_heads,
            "image_size": 32, "patch_size": 4, "qkv_bias": True, "qk_normalization": False,
            "norm_type": "layer_norm", "layer_norm_eps": vision.layer_norm_eps, "hidden_act": "gelu",
        },
        "select_layer": -1, "downsample_ratio": 0.5, "force_image_size": 32, "ps_version": "v2",
        "min_dynamic_patch": 1, "max_dynamic_patch": 4, "use_thumbnail": True,
    }


def chat_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' InternVL names → InternVL2's own (what InternVLChatModel checkpoints hold)."""
    out: dict[str, torch.Tensor] = {}
    layer_parts = {
        "attention.projection_layer": "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2",
        "lambda_1": "ls1", "lambda_2": "ls2", "mlp": "mlp",
    }
    prefixes = {
        "model.vision_tower.embeddings.cls_token": "vision_model.embeddings.class_embedding",
        "model.vision_tower.embeddings.patch_embeddings.projection": "vision_model.embeddings.patch_embedding",
        "model.vision_tower.embeddings.position_embeddings": "vision_model.embeddings.position_embedding",
        "model.multi_modal_projector.layer_norm": "mlp1.0",
        "model.multi_modal_projector.linear_1": "mlp1.1",
        "model.multi_modal_projector.linear_2": "mlp1.3",
        "model.language_model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
    }
    for name, tensor in state_dict.items():
        if name.startswith("model.vision_tower.encoder.layer."):
            index, sub = name[len("model.vision_tower.encoder.layer."):].split(".", 1)
            if sub.startswith("attention.q_proj"):
                kind = sub.rsplit(".", 1)[1]
                parts = [state_dict[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"vision_model.encoder.layers.{index}.attn.qkv.{kind}"] = torch.cat(parts)
            elif not sub.startswith(("attention.k_proj", "attention.v_proj")):
                old = next(o for o in layer_parts if sub.startswith(o))
                out[f"vision_model.encoder.layers.{index}.{layer_parts[old]}{sub[len(old):]}"] = tensor
            continue
        old = next(o for o in prefixes if name.startswith(o))
        out[prefixes[old] + name[len(old):]] = tensor
    return out
