"""The multi-modal section of the engine config: limit_mm_per_prompt, mm_processor_kwargs and
the processed-input cache, checked against the modalities the model's architecture takes."""

from __future__ import annotations

import logging
from typing import Any

from transformers import PretrainedConfig

from pagedllm import envs
from pagedllm.config import MultiModalConfig

logger = logging.getLogger(__name__)


def build_multimodal_config(args: dict[str, Any], hf_config: PretrainedConfig) -> MultiModalConfig | None:
    from pagedllm.multimodal.registry import modalities_of

    architecture = (getattr(hf_config, "architectures", None) or [""])[0]
    modalities = modalities_of(architecture)
    limits, kwargs = args["limit_mm_per_prompt"], args["mm_processor_kwargs"]
    if not modalities:
        if limits or kwargs:
            name = "limit_mm_per_prompt" if limits else "mm_processor_kwargs"
            raise ValueError(f"{name} was given, but {architecture or 'the model'} is not a multi-modal model; drop {name}.")
        return None
    if limits is not None and not isinstance(limits, dict):
        raise ValueError(f"limit_mm_per_prompt must be a dict like {{'image': 2, 'video': 0}}, got {limits!r}.")
    counts: dict[str, int] = {}
    for modality, limit in (limits or {}).items():
        count = _limit_count(modality, limit)
        if modality in modalities:
            counts[modality] = count
        else:
            # As vLLM: a limit for a modality the model lacks (e.g. {"image": 0, "video": 0} for an
            # image-only model) has nothing to limit.
            logger.warning("limit_mm_per_prompt[%r] is ignored: %s takes %s only.", modality, architecture,
                           ", ".join(modalities))
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"mm_processor_kwargs must be a dict, e.g. {{'max_pixels': 602112}}, got {kwargs!r}.")
    config = MultiModalConfig(
        modalities=modalities,
        limit_per_prompt=counts,
        mm_processor_kwargs=dict(kwargs or {}),
        input_cache_bytes=_mm_input_cache_bytes(args["mm_processor_cache_gb"]),
    )
    logger.info(
        "Multi-modal %s: items per prompt %s%s, processor kwargs %s, input cache %.1f GiB.",
        architecture, {m: config.limit_of(m) for m in modalities},
        " (text only: the vision tower is not loaded)" if config.is_text_only else "",
        config.mm_processor_kwargs, config.input_cache_bytes / (1 << 30),
    )
    return config


def _limit_count(modality: str, limit: Any) -> int:
    """A limit as vLLM takes it: a count, or {"count": n, ...} (its other keys, the size of the
    dummy items vLLM profiles with, do not apply here: the engine profiles the largest item)."""
    if isinstance(limit, dict):
        if "count" not in limit:
            raise ValueError(f"limit_mm_per_prompt[{modality!r}] needs a 'count', e.g. {{'count': 2}}, got {limit!r}.")
        limit = limit["count"]
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(
            f"limit_mm_per_prompt[{modality!r}] must be an integer >= 0 (0 turns it off) or {{'count': n}}, got {limit!r}."
        )
    return limit


def _mm_input_cache_bytes(cache_gib: Any) -> int:
    """mm_processor_cache_gb when given, else the env var (which defaults to 4 GiB)."""
    if cache_gib is None:
        return envs.mm_input_cache_bytes()
    if isinstance(cache_gib, bool) or not isinstance(cache_gib, (int, float)) or cache_gib < 0:
        raise ValueError(
            f"mm_processor_cache_gb must be a number of GiB >= 0 (e.g. 4; 0 turns the cache off), got {cache_gib!r}."
        )
    return int(cache_gib * (1 << 30))
