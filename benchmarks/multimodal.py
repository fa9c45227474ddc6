"""Multi-modal serving: a batch of image prompts on Qwen2.5-VL-3B's (or Gemma-3-4B's)
architecture with dummy weights and CUDA graphs for decode, against transformers `generate`
on the same architecture in the same run; then the memory that limit_mm_per_prompt 0 and a
smaller max_pixels give back to the KV cache.

    PYTHONPATH=. python3 benchmarks/multimodal.py [--model qwen2.5-vl-3b|gemma-3-4b]
        [--num-prompts 64] [--image-size 448] [--max-tokens 64] [--hf-prompts 16]

Prompts are token ids (no tokenizer is shipped with dummy weights): some text ids, one image
placeholder, more text ids, each with its own random image of image-size x image-size pixels.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image

from benchmarks.common import print_table, timed

QWEN2_5_VL_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": True, "dtype": "bfloat16",
    "text_config": {
        "model_type": "qwen2_5_vl_text", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
        "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
        "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    },
    "vision_config": {
        "model_type": "qwen2_5_vl_vision", "depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
        "num_heads": 16, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2, "hidden_act": "silu", "in_channels": 3,
    },
}
GEMMA_3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "image_token_index": 262144, "boi_token_index": 255999, "eoi_token_index": 256000,
    "mm_tokens_per_image": 256, "dtype": "bfloat16",
    "text_config": {
        "model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240,
        "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "sliding_window": 1024, "max_position_embeddings": 131072, "query_pre_attn_scalar": 256,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
    },
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
        "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14, "image_size": 896,
        "vision_use_head": False,
    },
}
MODELS = {"qwen2.5-vl-3b": QWEN2_5_VL_3B, "gemma-3-4b": GEMMA_3_4B}
SMALL_MAX_PIXELS = 256 * 28 * 28  # the default is 12845056 (16384 tokens); 256 tokens per image


def write_model_dir(name: str) -> str:
    folder = tempfile.mkdtemp(prefix=f"pagedllm-{name}-")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(MODELS[name], f, indent=1)
    # The PIL processors (named ...Pil in transformers >= 5.2x) need no torchvision.
    # The settings of the models' own preprocessor_config.json: Qwen2.5-VL up to 12845056
    # pixels (16384 tokens), Gemma 3 at 896 x 896 (256 tokens).
    if name.startswith("qwen"):
        base, settings = "Qwen2VLImageProcessor", {"max_pixels": 12845056, "min_pixels": 3136}
    else:
        base, settings = "Gemma3ImageProcessor", {"size": {"height": 896, "width": 896}}
    processor = (getattr(transformers, f"{base}Pil", None) or getattr(transformers, base))(**settings)
    processor.save_pretrained(folder)
    return folder


def make_prompts(llm: Any, num_prompts: int, image_size: int, seed: int) -> list[dict]:
    adapter = llm.llm_engine.input_processor.mm_processor.adapter
    mark = adapter.placeholder_token_id("image")
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(num_prompts):
        pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        ids = rng.integers(1000, 30000, 24).tolist()
        prompts.append({"prompt_token_ids": ids[:8] + [mark] + ids[8:], "multi_modal_data": {"image": Image.fromarray(pixels)}})
    return prompts


def engine_kwargs(**extra: Any) -> dict:
    return dict(load_format="dummy", skip_tokenizer_init=True, max_model_len=8192, gpu_memory_utilization=0.85, **extra)


def run_pagedllm(folder: str, args: argparse.Namespace) -> tuple[float, float, list[dict], Any]:
    from pagedllm import LLM, SamplingParams

    llm = LLM(folder, **engine_kwargs())
    prompts = make_prompts(llm, args.num_prompts, args.image_size, seed=0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(make_prompts(llm, 4, args.image_size, seed=1), params, use_tqdm=False)  # warm-up
    outputs, seconds = timed(lambda: llm.generate(prompts, params, use_tqdm=False))
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    processed = [llm.llm_engine.process_input(p, params) for p in prompts[: args.hf_prompts]]
    shutdown(llm)
    return args.num_prompts / seconds, num_tokens / seconds, processed, outputs


def hf_rates(folder: str, processed: list[Any], args: argparse.Namespace) -> tuple[float, float]:
    """transformers generate on the same prompts (same expanded ids and pixels), one static
    batch (all images the same size, so no padding)."""
    config = transformers.AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.tensor([p.prompt_token_ids for p in processed], device="cuda")
    tensors: dict[str, list[torch.Tensor]] = {}
    for p in processed:
        for feature in p.mm_inputs.features:
            for key, value in feature.data.items():
                tensors.setdefault(key, []).append(value)
    inputs = {k: torch.cat(v).to("cuda") for k, v in tensors.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    # Newer transformers take the image positions as token type ids (M-RoPE / Gemma's mask).
    import inspect

    image_token = getattr(config, "image_token_id", None) or getattr(config, "image_token_index")
    for name in ("mm_token_type_ids", "token_type_ids"):
        if name in inspect.signature(model.forward).parameters:
            inputs[name] = (ids == image_token).to(torch.int32 if name.startswith("mm") else torch.long)
            break
    generate = lambda: model.generate(  # noqa: E731
        input_ids=ids, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False,
        pad_token_id=0, **inputs,
    )
    with torch.no_grad():
        _, seconds = timed(generate)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return len(processed) / seconds, len(processed) * args.max_tokens / seconds


def memory_report(folder: str, modalities: tuple[str, ...]) -> list[tuple[str, str]]:
    from pagedllm import LLM

    rows = []
    one_image = {**dict.fromkeys(modalities, 0), "image": 1}
    variants = {
        "default": {},
        f"limit_mm_per_prompt {dict.fromkeys(modalities, 0)}": {"limit_mm_per_prompt": dict.fromkeys(modalities, 0)},
        f"limit_mm_per_prompt {one_image}": {"limit_mm_per_prompt": one_image},
        f"limit_mm_per_prompt {one_image}, max_pixels={SMALL_MAX_PIXELS}": {
            "limit_mm_per_prompt": one_image, "mm_processor_kwargs": {"max_pixels": SMALL_MAX_PIXELS},
        },
    }
    baseline = None
    for name, extra in variants.items():
        if "max_pixels" in name and not folder_has_qwen(folder):
            continue
        # A headroom this large lifts the cap at max_num_seqs x max_model_len, so the KV cache
        # shows the whole budget that profiling left, which is what the settings change.
        llm = LLM(folder, **engine_kwargs(kv_cache_headroom=1000.0, **extra))
        kv_bytes = llm.llm_engine.executor.collective_rpc("kv_cache_bytes")[0]
        model = llm.llm_engine.executor.worker.model_runner.model
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        del model
        shutdown(llm)
        baseline = kv_bytes if baseline is None else baseline
        rows.append((
            f"KV cache, {name}",
            f"{kv_bytes / 2**30:.2f} GiB (+{(kv_bytes - baseline) / 2**30:.2f} GiB vs default); weights {weights / 2**30:.2f} GiB",
        ))
    return rows


def folder_has_qwen(folder: str) -> bool:
    with open(os.path.join(folder, "config.json")) as f:
        return "qwen" in json.load(f)["model_type"]


def shutdown(llm: Any) -> None:
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-vl-3b")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--hf-prompts", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    from pagedllm.models.registry import supported_architectures

    architecture = MODELS[args.model]["architectures"][0]
    if architecture not in supported_architectures():
        raise SystemExit(f"{architecture} is not in this build's model registry (merge its family first).")
    folder = write_model_dir(args.model)
    images_s, tokens_s, processed, _ = run_pagedllm(folder, args)
    hf_images_s, hf_tokens_s = hf_rates(folder, processed, args)
    modalities = ("image", "video") if args.model.startswith("qwen") else ("image",)
    print_table(
        f"{args.model} (dummy weights, bf16): {args.num_prompts} prompts of one {args.image_size}x{args.image_size} "
        f"image, {args.max_tokens} output tokens, CUDA graphs for decode",
        [
            ("pagedllm images/s", f"{images_s:.1f}"),
            ("pagedllm output tokens/s", f"{tokens_s:.0f}"),
            (f"transformers images/s ({len(processed)} prompts, one batch)", f"{hf_images_s:.1f}"),
            ("transformers output tokens/s", f"{hf_tokens_s:.0f}"),
            ("ratio (tokens/s)", f"{tokens_s / hf_tokens_s:.1f}x"),
            *memory_report(folder, modalities),
        ],
    )


if __name__ == "__main__":
    main()
