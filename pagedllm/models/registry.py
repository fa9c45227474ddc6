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


# Out-of-tree families added with ModelRegistry.register_model: architecture → the class, or
# "package.module:Class" imported on first use (vLLM's two forms).
_REGISTERED: dict[str, type[nn.Module] | str] = {}


def supported_architectures() -> list[str]:
    return sorted({*_MODELS, *_REGISTERED})


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture in _REGISTERED:
        registered = _REGISTERED[architecture]
        if isinstance(registered, str):
            module_name, _, class_name = registered.partition(":")
            return getattr(importlib.import_module(module_name), class_name)
        return registered
    if architecture not in _MODELS:
        raise ValueError(
            f"Model architecture {architecture!r} (config.json 'architectures') is not "
            f"supported; supported architectures: {', '.join(supported_architectures())}."
        )
    module_name, class_name = _MODELS[architecture]
    module = importlib.import_module(f"pagedllm.models.{module_name}")
    return getattr(module, class_name)


class ModelRegistry:
    """vLLM's `ModelRegistry`: the architectures pagedllm runs, and a way to add a family
    written against pagedllm's layers (its constructor and load_weights as models/llama.py's).
    Worker processes see a registration made when a module they import is imported (or with
    forked ranks, one made before the LLM is created)."""

    @staticmethod
    def get_supported_archs() -> list[str]:
        return supported_architectures()

    @staticmethod
    def register_model(model_arch: str, model_cls: type[nn.Module] | str) -> None:
        """`model_cls`: the class, or "package.module:Class" (imported when first used)."""
        if isinstance(model_cls, str) and ":" not in model_cls:
            raise ValueError(f"model_cls={model_cls!r}: give the class, or 'package.module:ClassName'.")
        _REGISTERED[model_arch] = model_cls
