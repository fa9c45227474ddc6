"""What a model's config.json (or GGUF metadata) says, as the config builder reads it: the
config itself with `hf_overrides` applied, its dtype and context length, and vLLM's rule for
`dtype="auto"`."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from pagedllm.config import text_config_of

logger = logging.getLogger(__name__)

_STR_TO_DTYPE = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Keys of config.json that may hold the context length, most specific first (vLLM's list).
_CONTEXT_LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
    "model_max_length",
)


def apply_hf_overrides(hf_config: PretrainedConfig, hf_overrides: Any) -> PretrainedConfig:
    """vLLM's `hf_overrides`: a dict merged into config.json (nested dicts into nested
    configs such as text_config), or a callable that returns the new config."""
    if hf_overrides is None:
        return hf_config
    if callable(hf_overrides):
        result = hf_overrides(hf_config)
        if not isinstance(result, PretrainedConfig):
            raise ValueError(f"hf_overrides must return a PretrainedConfig, got {type(result).__name__}.")
        return result
    if not isinstance(hf_overrides, dict):
        raise ValueError(
            f"hf_overrides must be a dict (e.g. {{'rope_theta': 1e6}}) or a callable, got {hf_overrides!r}."
        )
    for key, value in hf_overrides.items():
        current = getattr(hf_config, key, None)
        if isinstance(value, dict) and isinstance(current, PretrainedConfig):
            apply_hf_overrides(current, value)
        elif key in ("rope_theta", "rope_scaling") and isinstance(vars(hf_config).get("rope_parameters"), dict):
            _override_rope_parameters(hf_config, key, value)
        else:
            setattr(hf_config, key, value)
    return hf_config


def _override_rope_parameters(hf_config: PretrainedConfig, key: str, value: Any) -> None:
    """transformers 5 reads the rope settings from `config.rope_parameters` alone: a
    `rope_theta` attribute set afterwards is never read, and setting `rope_scaling` replaces
    the dict, losing its rope_theta. The override goes into rope_parameters instead (into
    each layer type's dict where they are nested, except Gemma 3's sliding layers, which the old
    config.json set apart with rope_local_base_freq and no scaling)."""
    params = hf_config.rope_parameters
    nested = bool(params) and all(isinstance(v, dict) for v in params.values())
    targets = [name for name in params if name != "sliding_attention"] if nested else [None]
    for name in targets:
        current = dict(params[name] if name is not None else params)
        if key == "rope_theta":
            current["rope_theta"] = value
        else:
            scaling = dict(value or {"rope_type": "default"})
            if "type" in scaling:  # the old spelling of rope_type
                scaling["rope_type"] = scaling.pop("type")
            current = {"rope_theta": current.get("rope_theta"), **scaling}
        if name is None:
            params = current
        else:
            params[name] = current
    hf_config.rope_parameters = params
    if key == "rope_theta":
        setattr(hf_config, key, value)  # also kept as an attribute, for code that reads it


def resolve_dtype(requested: str | torch.dtype, config_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """vLLM's rules for `dtype`: "auto" takes the checkpoint's dtype (config.json's
    `torch_dtype`/`dtype`), except that a float32 (or missing) one becomes bfloat16 on a GPU
    that supports it (float16 otherwise), since serving in float32 halves throughput; on CPU,
    float32 and float16 checkpoints stay float32 (CPUs lack fast float16 kernels) and bfloat16
    stays bfloat16. An explicit dtype is used as given."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested != "auto":
        if requested not in _STR_TO_DTYPE:
            raise ValueError(
                f"dtype={requested!r} is not supported; use one of "
                f"'auto', {', '.join(repr(k) for k in _STR_TO_DTYPE)}."
            )
        return _STR_TO_DTYPE[requested]
    if device.type == "cuda":
        if config_dtype in (torch.float16, torch.bfloat16):
            return config_dtype
        # Planning without a GPU (`pagedllm plan`) assumes a current one, with bfloat16.
        return torch.bfloat16 if torch.cuda.device_count() == 0 or torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if config_dtype == torch.bfloat16 else torch.float32


def config_dtype_of(hf_config: PretrainedConfig) -> torch.dtype | None:
    # transformers 5 calls it `dtype`; reading the old `torch_dtype` alias only warns.
    value = getattr(hf_config, "dtype", None) or vars(hf_config).get("torch_dtype")
    if isinstance(value, str):
        return _STR_TO_DTYPE.get(value)
    return value if isinstance(value, torch.dtype) else None


def derive_max_model_len(hf_config: PretrainedConfig) -> int:
    """The model's context length from config.json (the smallest of the keys present), times
    its rope scaling factor as vLLM derives it: linear scaling stretches the positions it was
    trained on, YaRN extends original_max_position_embeddings; llama3-type scaling, and
    Gemma 3, whose max_position_embeddings is already the scaled length, are taken as given."""
    hf_config = text_config_of(hf_config)
    lengths = [
        int(value)
        for key in _CONTEXT_LENGTH_KEYS
        if isinstance(value := getattr(hf_config, key, None), (int, float)) and value > 0
    ]
    length = min(lengths) if lengths else 2048
    if "gemma3" in str(getattr(hf_config, "model_type", "")):
        return length
    from pagedllm.layers.rotary_embedding import rope_parameters_of, scaled_context_length

    try:
        rope = rope_parameters_of(hf_config)
    except ValueError:  # rope settings per layer type: no single scaling to apply
        return length
    return scaled_context_length(rope, length)


def read_hf_config(model_path: str, gguf_file: str | None, trust_remote_code: bool, revision: str | None) -> PretrainedConfig:
    if gguf_file is not None:
        from pagedllm.model_loader.gguf import load_gguf_config

        return load_gguf_config(gguf_file)
    config_path = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"model={model_path!r} has no config.json: pass a model folder or hub id.")
    from pagedllm.models.registry import read_remote_code_config

    # Remote-code checkpoints whose model pagedllm implements (InternVL2's InternVLChatModel)
    # are read without their code.
    native = read_remote_code_config(config_path)
    if native is not None:
        return native
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code, revision=revision)
    _adopt_quantization_config(config, model_path)
    return config


# Quantization configs older tools wrote beside config.json, and the method each one means.
_QUANTIZATION_FILES = (("quantize_config.json", "gptq"), ("quant_config.json", "awq"))


def _adopt_quantization_config(config: PretrainedConfig, model_path: str) -> None:
    """Where vLLM also finds a checkpoint's quantization config when config.json has no
    quantization_config: the older `compression_config` key (compressed-tensors), the text
    config's (multi-modal wrappers), and AutoGPTQ's quantize_config.json or AutoAWQ's
    quant_config.json. It becomes config.quantization_config, so that every reader sees it."""
    if getattr(config, "quantization_config", None) is not None:
        return
    found = getattr(config, "compression_config", None)
    if found is not None:
        found = dict(found) if isinstance(found, dict) else found.to_dict()
        if found.get("quant_method") in (None, "", "sparseml"):  # what older llm-compressor wrote
            found["quant_method"] = "compressed-tensors"
    text_config = getattr(config, "text_config", None)
    if found is None and text_config is not None:
        found = getattr(text_config, "quantization_config", None)
    if found is None:
        for file_name, method in _QUANTIZATION_FILES:
            path = os.path.join(model_path, file_name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as file:
                    data = json.load(file)
                if "w_bit" in data:  # AutoAWQ's keys, under either file name
                    method = "awq"
                found = {"quant_method": method, **data}
                logger.debug("Quantization config read from %s.", file_name)
                break
    if found is not None:
        config.quantization_config = found if isinstance(found, dict) else found.to_dict()
