"""The model's generation_config.json, read as vLLM reads it. No torch.

`generation_config="auto"` (the default) reads the model folder's file, `"vllm"` ignores its
sampling fields (vLLM's own defaults apply), and any other value is a folder holding a
generation_config.json. Every EOS id the file lists stops generation, whichever mode is
chosen (vLLM keeps them with "vllm" too: Llama 3.1 must still stop at <|eom_id|>).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"

# generation_config.json field -> SamplingParams field: the sampling fields vLLM takes as
# defaults (get_diff_sampling_param).
_SAMPLING_FIELDS = {
    "repetition_penalty": "repetition_penalty",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "max_new_tokens": "max_tokens",
}


@dataclass(frozen=True)
class GenerationDefaults:
    """What the engine takes from generation_config.json."""

    eos_token_ids: frozenset[int] = frozenset()
    """Every EOS id listed there (or in config.json when there is no file)."""
    sampling_overrides: dict[str, Any] = field(default_factory=dict)
    """SamplingParams field -> value: the defaults of LLM.get_default_sampling_params()."""


def _read_json(folder: str | None) -> dict[str, Any] | None:
    if folder is None:
        return None
    path = os.path.join(folder, GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def _as_id_set(value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int) and not isinstance(value, bool):
        return frozenset((value,))
    return frozenset(int(v) for v in value if isinstance(v, int) and not isinstance(v, bool))


def load_generation_defaults(
    generation_config: str,
    model_path: str | None,
    hf_config_eos: Any,
    override_generation_config: dict[str, Any] | None = None,
) -> GenerationDefaults:
    """Reads the file `generation_config` points to; falls back to config.json's eos_token_id
    (vLLM builds a GenerationConfig from the model config when the file is missing)."""
    if generation_config in ("auto", "vllm"):
        data = _read_json(model_path)
    else:
        if not os.path.isdir(generation_config):
            raise ValueError(
                f"generation_config={generation_config!r} is not a folder; use 'auto' (the model's "
                "generation_config.json), 'vllm' (ignore it), or a folder holding one."
            )
        data = _read_json(generation_config)
        if data is None:
            raise ValueError(
                f"generation_config={generation_config!r} has no {GENERATION_CONFIG_FILE}; use "
                "'auto', 'vllm', or a folder holding one."
            )
    data = dict(data or {})
    eos_ids = _as_id_set(data.get("eos_token_id")) if "eos_token_id" in data else _as_id_set(hf_config_eos)
    overrides: dict[str, Any] = {}
    if generation_config != "vllm":
        overrides = {name: data[key] for key, name in _SAMPLING_FIELDS.items() if data.get(key) is not None}
    for key, value in (override_generation_config or {}).items():
        name = _SAMPLING_FIELDS.get(key, key)
        if name not in _SAMPLING_FIELDS.values():
            raise ValueError(
                f"override_generation_config has unknown key {key!r}; use one of {sorted(_SAMPLING_FIELDS)}."
            )
        overrides[name] = value
    if overrides:
        logger.info(
            "Default sampling parameters from the model's generation config: %s. Pass "
            "generation_config='vllm' to use pagedllm's defaults instead.",
            ", ".join(f"{k}={v!r}" for k, v in sorted(overrides.items())),
        )
    if len(eos_ids) > 1:
        logger.info("Generation stops at any of the EOS ids %s.", sorted(eos_ids))
    return GenerationDefaults(eos_token_ids=eos_ids, sampling_overrides=overrides)
