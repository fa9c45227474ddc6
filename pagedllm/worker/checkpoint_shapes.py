"""Names, shapes and dtypes of a checkpoint's tensors without reading any weight: from the
safetensors JSON headers, the GGUF tensor infos, or (no readable weight files, a hub id,
load_format='dummy') from config.json's sizes. For `pagedllm plan`."""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass

from pagedllm.config import EngineConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    """safetensors' dtype name (BF16, F32, I32, F8_E4M3, ...)."""


def read_checkpoint_tensors(config: EngineConfig) -> tuple[list[CheckpointTensor], str]:
    """Names, shapes and dtypes of the checkpoint's tensors, from headers only."""
    model_config = config.model_config
    if model_config.gguf_file is not None:
        return _gguf_tensors(model_config.gguf_file), "GGUF metadata"
    if config.load_config.load_format != "dummy":
        from pagedllm.model_loader.weight_utils import find_weight_files

        try:
            files, weight_format = find_weight_files(model_config.model_path, config.load_config.load_format)
        except ValueError:
            files, weight_format = [], ""
        if files and weight_format == "safetensors":
            return [t for path in files for t in _safetensors_tensors(path)], "safetensors headers"
    return config_tensors(config), "config.json shapes"


def _safetensors_tensors(path: str) -> list[CheckpointTensor]:
    with open(path, "rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_size))
    return [
        CheckpointTensor(name, tuple(entry["shape"]), entry["dtype"])
        for name, entry in header.items()
        if name != "__metadata__" and "rotary_emb.inv_freq" not in name
    ]


def _gguf_tensors(gguf_file: str) -> list[CheckpointTensor]:
    import gguf

    from pagedllm.model_loader.gguf import hf_tensor_name

    reader = gguf.GGUFReader(gguf_file)
    tensors = []
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is not None:
            # The loader dequantizes to the engine's dtype: count them as a float tensor.
            tensors.append(CheckpointTensor(name, tuple(int(d) for d in reversed(tensor.shape)), "F32"))
    return tensors


def config_tensors(config: EngineConfig) -> list[CheckpointTensor]:
    """The decoder's parameters from config.json (Llama layout; Qwen2's q/k/v biases and
    Qwen3's q/k norms), and a multi-modal model's vision tower: for load_format='dummy' and
    checkpoints without readable headers."""
    return _decoder_tensors(config) + _vision_tensors(config)


def _vision_tensors(config: EngineConfig) -> list[CheckpointTensor]:
    """The vision tower and projector of a multi-modal model, named as its checkpoint names
    them: transformers' own model of the architecture, built on the meta device (no memory),
    keeps the parameters under the family's vision checkpoint prefixes."""
    model_config = config.model_config
    if model_config.multimodal_config is None:
        return []
    import torch
    import transformers

    from pagedllm.models.registry import get_model_class

    prefixes = tuple(getattr(get_model_class(model_config.architecture), "vision_checkpoint_prefixes", ()))
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForImageTextToText.from_config(model_config.hf_config)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        # A remote-code layout (InternVL2's chat checkpoints) has no transformers class.
        logger.warning("The plan leaves out %s's vision tower (%s: %s).", model_config.architecture,
                       type(error).__name__, error)
        return []
    return [CheckpointTensor(name, tuple(parameter.shape), "F32") for name, parameter in model.named_parameters()
            if name.startswith(prefixes)]


def _decoder_tensors(config: EngineConfig) -> list[CheckpointTensor]:
    model_config = config.model_config
    hf_config = model_config.hf_config
    hidden, head_dim = model_config.hidden_size, model_config.head_dim
    q_size = model_config.num_attention_heads * head_dim
    kv_size = model_config.num_key_value_heads * head_dim
    # A multi-modal model's decoder sizes are in its text config.
    intermediate = int(model_config.text_config.intermediate_size)
    architecture = model_config.architecture
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (model_config.vocab_size, hidden)}
    for layer in range(model_config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        layer_shapes = {
            "self_attn.q_proj.weight": (q_size, hidden), "self_attn.k_proj.weight": (kv_size, hidden),
            "self_attn.v_proj.weight": (kv_size, hidden), "self_attn.o_proj.weight": (hidden, q_size),
            "mlp.gate_proj.weight": (intermediate, hidden), "mlp.up_proj.weight": (intermediate, hidden),
            "mlp.down_proj.weight": (hidden, intermediate),
            "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        }
        if architecture.startswith("Qwen2"):
            layer_shapes.update({"self_attn.q_proj.bias": (q_size,), "self_attn.k_proj.bias": (kv_size,),
                                 "self_attn.v_proj.bias": (kv_size,)})
        if architecture.startswith("Qwen3"):
            layer_shapes.update({"self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,)})
        shapes.update({prefix + name: shape for name, shape in layer_shapes.items()})
    shapes["model.norm.weight"] = (hidden,)
    if not getattr(hf_config, "tie_word_embeddings", False):
        shapes["lm_head.weight"] = (model_config.vocab_size, hidden)
    return [CheckpointTensor(name, shape, "F32") for name, shape in shapes.items()]
