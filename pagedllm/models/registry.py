"""Architecture name (config.json `architectures[0]`) → model class, imported on first use."""

from __future__ import annotations

import importlib

from torch import nn

# architecture → (module under pagedllm.models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": ("gemma3_mm", "Gemma3ForConditionalGeneration"),
    "InternVLChatModel": ("internvl", "InternVLChatModel"),
    "InternVLForConditionalGeneration": ("internvl", "InternVLForConditionalGeneration"),
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(
            f"Model architecture {architecture!r} (config.json 'architectures') is not "
            f"supported; supported architectures: {', '.join(supported_architectures())}."
        )
    module_name, class_name = _MODELS[architecture]
    module = importlib.import_module(f"pagedllm.models.{module_name}")
    return getattr(module, class_name)
