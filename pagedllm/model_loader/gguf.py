"""Native GGUF loading: the config and tokenizer come from the file's metadata, the weights are
dequantized to float32 and renamed to Hugging Face names, so a .gguf file loads into the same
model classes as a Hugging Face folder.

The engine calls, in order: `load_gguf_config(file)`, `load_gguf_tokenizer(file)` (a folder to
pass as `tokenizer=`), then feeds `gguf_weights_iterator(file, config)` to `model.load_weights`.
Derived files (config.json and the tokenizer) are kept under
`PAGEDLLM_CACHE_ROOT/gguf/<file stem>-<hash of size, mtime>/` so later starts skip the
metadata parsing (GGUFReader takes ~2.3 s on SmolLM2's 49k-token vocabulary, transformers'
tokenizer conversion ~5 s)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

from pagedllm import envs

logger = logging.getLogger(__name__)

# Bump when the derived files change meaning, so old cache folders are not reused.
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class _ArchSpec:
    model_type: str
    """transformers' model_type of the family."""
    architecture: str
    """The class name the model registry knows the family by."""
    permute_qk: bool
    """llama.cpp's converter reorders Q/K rows for this family (its rope is interleaved)."""


_ARCHS: dict[str, _ArchSpec] = {
    "llama": _ArchSpec("llama", "LlamaForCausalLM", permute_qk=True),
    # Qwen2/3 use llama.cpp's NEOX rope, which matches HF's layout: no permutation.
    "qwen2": _ArchSpec("qwen2", "Qwen2ForCausalLM", permute_qk=False),
    "qwen3": _ArchSpec("qwen3", "Qwen3ForCausalLM", permute_qk=False),
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Llama 3.1+ files carry their rope scaling as per-frequency factors; we (like transformers'
# GGUF loader) do not rebuild `rope_parameters` from them, which changes low-frequency rotary
# components slightly.
_SKIPPED_TENSORS = {"rope_freqs.weight"}


def gguf_cache_dir(gguf_file: str) -> str:
    """The folder that holds what pagedllm derives from `gguf_file` (config.json, tokenizer).

    Keyed by size and modification time rather than a content hash, which would read the whole
    file at every start."""
    stat = os.stat(gguf_file)
    key = f"{stat.st_size}:{stat.st_mtime_ns}:{_CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(gguf_file))[0]
    return os.path.join(envs.cache_root(), "gguf", f"{stem}-{digest}")


def load_gguf_config(gguf_file: str) -> PretrainedConfig:
    """The model's transformers config, built from the GGUF metadata (cached as config.json)."""
    _check_file(gguf_file)
    cached = os.path.join(gguf_cache_dir(gguf_file), "config.json")
    if os.path.isfile(cached):
        return AutoConfig.from_pretrained(os.path.dirname(cached))
    config = config_from_reader(gguf.GGUFReader(gguf_file), gguf_file)
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cached), prefix=".config-", suffix=".json")
        os.close(fd)
        config.to_json_file(tmp)
        os.replace(tmp, cached)
    except OSError as e:
        # The cache only saves time; a read-only cache root must not stop the model loading.
        logger.warning("Could not cache the GGUF config under %s (%s).", os.path.dirname(cached), e)
    return config


def config_from_reader(reader: gguf.GGUFReader, gguf_file: str) -> PretrainedConfig:
    """Build the config from an open reader (no caching)."""
    arch = str(_field(reader, "general.architecture", gguf_file))
    spec = _arch_spec(arch, gguf_file)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise ValueError(f"GGUF file {gguf_file!r} has no token_embd.weight tensor; it is not a complete {arch} model.")

    def meta(key: str, default: Any = ...) -> Any:
        return _field(reader, f"{arch}.{key}", gguf_file, default)

    hidden_size = int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    num_kv_heads = _uniform(meta("attention.head_count_kv", num_heads), "attention.head_count_kv", gguf_file)
    head_dim = meta("attention.key_length", None) or meta("rope.dimension_count", None) or hidden_size // num_heads
    kwargs: dict[str, Any] = {
        "architectures": [spec.architecture],
        # The embedding's rows, not the token list, size the model (vocabularies may be padded).
        "vocab_size": int(embed.shape[1]),
        "hidden_size": hidden_size,
        "intermediate_size": _uniform(meta("feed_forward_length"), "feed_forward_length", gguf_file),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": int(head_dim),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(meta("context_length")),
        "rope_parameters": _rope_parameters(reader, arch, gguf_file),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if arch == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensors
        kwargs["mlp_bias"] = "blk.0.ffn_gate.bias" in tensors
    for gguf_key, config_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("padding_token_id", "pad_token_id"),
        ("unknown_token_id", "unk_token_id"),
    ):
        value = _field(reader, f"tokenizer.ggml.{gguf_key}", gguf_file, None)
        if value is not None:
            kwargs[config_key] = int(value)
    return AutoConfig.for_model(spec.model_type, **kwargs)


def load_gguf_tokenizer(gguf_file: str) -> str:
    """Convert the tokenizer in the GGUF metadata (through transformers) once and return the
    cached tokenizer folder, to be used as `tokenizer=`."""
    _check_file(gguf_file)
    folder = gguf_cache_dir(gguf_file)
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return folder
    from transformers import AutoTokenizer

    logger.info("Converting the tokenizer of %s (once; cached in %s).", gguf_file, folder)
    tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(gguf_file)), gguf_file=os.path.basename(gguf_file), local_files_only=True
    )
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=folder, prefix=".tokenizer-")
        try:
            tokenizer.save_pretrained(tmp)
            # tokenizer_config.json goes last: its presence is what marks the folder complete,
            # so a concurrent start never sees half a tokenizer.
            for name in sorted(os.listdir(tmp), key=lambda n: n == "tokenizer_config.json"):
                os.replace(os.path.join(tmp, name), os.path.join(folder, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise ValueError(
            f"Could not write the tokenizer of {gguf_file!r} to {folder!r} ({e}); set PAGEDLLM_CACHE_ROOT to a "
            "writable folder, or pass tokenizer= a tokenizer folder."
        ) from e
    return folder


def gguf_weights_iterator(gguf_file: str, hf_config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, float32 tensor in the Hugging Face shape) for every tensor."""
    _check_file(gguf_file)
    reader = gguf.GGUFReader(gguf_file)
    arch = str(_field(reader, "general.architecture", gguf_file))
    spec = _arch_spec(arch, gguf_file)
    num_heads = int(hf_config.num_attention_heads)
    num_kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or num_heads)
    for tensor in tqdm(reader.tensors, desc="Loading GGUF tensors", unit="tensor"):
        name = hf_tensor_name(tensor.name)
        if name is None:
            if tensor.name in _SKIPPED_TENSORS:
                logger.warning("Ignoring %s in %s (rope scaling factors are not applied).", tensor.name, gguf_file)
                continue
            raise ValueError(
                f"GGUF tensor {tensor.name!r} in {gguf_file!r} has no Hugging Face counterpart for "
                f"architecture {arch!r}; supported tensors: {sorted(_GLOBAL_TENSORS)} and blk.N.{{{','.join(_BLOCK_TENSORS)}}}."
            )
        weight = _dequantize(tensor, gguf_file)
        if spec.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = undo_rope_permutation(weight, num_heads)
        elif spec.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = undo_rope_permutation(weight, num_kv_heads)
        yield name, weight


def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{suffix}"
    return None


def undo_rope_permutation(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's Q/K row permutation.

    HF Llama rotates halves: within a head, row j pairs with row j + head_dim/2. ggml's llama
    rope rotates adjacent rows (2i, 2i+1), so convert_hf_to_gguf reorders each head's rows
    from (2, head_dim/2) to (head_dim/2, 2) order; reading them as (head_dim/2, 2) and
    swapping back restores HF's order. Works for weights [rows, in] and biases [rows]."""
    rows = weight.shape[0]
    if rows % (2 * num_heads) != 0:
        raise ValueError(
            f"A Q/K tensor with {rows} rows cannot hold {num_heads} heads of even size; "
            "check num_attention_heads / num_key_value_heads in the GGUF metadata."
        )
    rest = tuple(weight.shape[1:])
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()


def _dequantize(tensor: Any, gguf_file: str) -> torch.Tensor:
    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} in {gguf_file!r} is {tensor.tensor_type.name}, which the installed gguf "
            f"package ({getattr(gguf, '__version__', '?')}) cannot dequantize; upgrade gguf or use a file quantized "
            "as F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q*_K."
        ) from None
    # GGUF lists dims fastest-first (ne0 = row length); torch wants them slowest-first.
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    # F32 data is a read-only view of the memory map: copy it so the tensor owns writable memory.
    if array.dtype != np.float32 or not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, dtype=np.float32, order="C")
    return torch.from_numpy(array).reshape(shape)


def _arch_spec(arch: str, gguf_file: str) -> _ArchSpec:
    spec = _ARCHS.get(arch)
    if spec is None:
        raise ValueError(
            f"GGUF file {gguf_file!r} has architecture {arch!r}, which pagedllm cannot load from GGUF; "
            f"supported GGUF architectures: {sorted(_ARCHS)}. Use the model's Hugging Face folder instead."
        )
    return spec


def _rope_parameters(reader: gguf.GGUFReader, arch: str, gguf_file: str) -> dict[str, Any]:
    theta = float(_field(reader, f"{arch}.rope.freq_base", gguf_file, 10000.0))
    scaling = _field(reader, f"{arch}.rope.scaling.type", gguf_file, "none")
    if scaling == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        factor = float(_field(reader, f"{arch}.rope.scaling.factor", gguf_file))
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    raise ValueError(
        f"GGUF file {gguf_file!r} uses {arch}.rope.scaling.type={scaling!r}; pagedllm reads only 'none' and "
        "'linear' from GGUF. Use the model's Hugging Face folder instead."
    )


def _field(reader: gguf.GGUFReader, key: str, gguf_file: str, default: Any = ...) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise ValueError(f"GGUF file {gguf_file!r} lacks the metadata key {key!r}; it cannot be loaded.")
        return default
    return field.contents()


def _uniform(value: Any, key: str, gguf_file: str) -> int:
    # Some files store per-layer values as arrays; our model classes need one value.
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(
                f"GGUF file {gguf_file!r} has per-layer {key}={value}; pagedllm needs the same value in every layer."
            )
        value = value[0]
    return int(value)


def _check_file(gguf_file: str) -> None:
    if not os.path.isfile(gguf_file):
        raise ValueError(f"GGUF file {gguf_file!r} does not exist; pass the path of a .gguf file.")
