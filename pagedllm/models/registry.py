"""Architecture name (config.json `architectures[0]`) → model class, imported on first use."""

from __future__ import annotations

import importlib
import json
import os

from torch import nn
from transformers import PretrainedConfig

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
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
}


# Remote-code architectures whose config.json we read ourselves: → (module, reader function).
_REMOTE_CODE_CONFIGS: dict[str, tuple[str, str]] = {
    "InternVLChatModel": ("internvl_config", "internvl_chat_config"),
}


def read_remote_code_config(config_path: str) -> PretrainedConfig | None:
    """The config of a checkpoint whose config.json names a remote-code architecture that
    pagedllm implements itself; None for every other checkpoint."""
    with open(config_path, encoding="utf-8") as f:
        config_dict = json.load(f)
    architecture = (config_dict.get("architectures") or [""])[0]
    if architecture not in _REMOTE_CODE_CONFIGS:
        return None
    module_name, function_name = _REMOTE_CODE_CONFIGS[architecture]
    module = importlib.import_module(f"pagedllm.models.{module_name}")
    return getattr(module, function_name)(config_dict, os.path.dirname(config_path))


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
