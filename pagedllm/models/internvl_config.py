"""The config of InternVL2's remote-code `InternVLChatModel` checkpoints, read from config.json
without running their code: the attributes internvl.py and the InternVL processor adapter
read, under the names transformers' InternVLConfig uses.

config.json has `llm_config` (a Qwen2 config), `vision_config` (InternViT), `select_layer`,
`downsample_ratio`, `force_image_size`, `min/max_dynamic_patch`, `use_thumbnail`; the
`<IMG_CONTEXT>` token id is the tokenizer's, found among its added tokens.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import AutoConfig, PretrainedConfig

IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"


def added_token_id(model_path: str, token: str) -> int | None:
    """The id of an added token, from tokenizer.json or tokenizer_config.json."""
    tokenizer_json = os.path.join(model_path, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
        with open(tokenizer_json, encoding="utf-8") as f:
            for entry in json.load(f).get("added_tokens", []):
                if entry.get("content") == token:
                    return int(entry["id"])
    tokenizer_config = os.path.join(model_path, "tokenizer_config.json")
    if os.path.isfile(tokenizer_config):
        with open(tokenizer_config, encoding="utf-8") as f:
            for token_id, entry in json.load(f).get("added_tokens_decoder", {}).items():
                if entry.get("content") == token:
                    return int(token_id)
    return None


def internvl_chat_config(config_dict: dict[str, Any], model_path: str) -> PretrainedConfig:
    llm = dict(config_dict["llm_config"])
    llm_type = llm.pop("model_type", None)
    if llm_type is None:
        raise ValueError(f"{model_path}/config.json: llm_config has no model_type (expected e.g. 'qwen2').")
    llm.pop("architectures", None)
    text_config = AutoConfig.for_model(llm_type, **llm)
    vision = dict(config_dict["vision_config"])
    image_size = int(config_dict.get("force_image_size") or vision.get("image_size", 448))
    vision.update(image_size=image_size, use_mean_pooling=True)
    image_token_id = config_dict.get("img_context_token_id") or added_token_id(model_path, IMG_CONTEXT_TOKEN)
    if image_token_id is None:
        raise ValueError(
            f"{model_path}: the tokenizer has no {IMG_CONTEXT_TOKEN} token; an InternVLChatModel checkpoint "
            "needs its tokenizer files (tokenizer.json or tokenizer_config.json) beside config.json."
        )
    if config_dict.get("ps_version", "v2") != "v2":
        raise ValueError(f"ps_version={config_dict['ps_version']!r} is not supported; InternVL2 uses 'v2'.")
    config = PretrainedConfig(
        architectures=["InternVLChatModel"],
        text_config=text_config,
        vision_config=PretrainedConfig(**vision),
        image_token_id=int(image_token_id),
        downsample_ratio=float(config_dict.get("downsample_ratio", 0.5)),
        projector_hidden_act="gelu",
        vision_feature_layer=int(config_dict.get("select_layer", -1)),
        vision_feature_select_strategy="default",
        min_dynamic_patch=int(config_dict.get("min_dynamic_patch", 1)),
        max_dynamic_patch=int(config_dict.get("max_dynamic_patch", 12)),
        use_thumbnail=bool(config_dict.get("use_thumbnail", True)),
        dynamic_image_size=bool(config_dict.get("dynamic_image_size", True)),
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
        dtype=config_dict.get("torch_dtype") or llm.get("torch_dtype"),
    )
    config.model_type = "internvl_chat"
    return config
