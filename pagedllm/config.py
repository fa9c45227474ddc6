"""Engine configuration: every option of `LLM(...)`, validated in one place.

Configs are frozen dataclasses built once by `EngineConfig.from_kwargs`; nothing mutates them
afterwards. Every field is documented where it is declared.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from pagedllm import envs

logger = logging.getLogger(__name__)

_STR_TO_DTYPE = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy", "gguf", "sharded_state")
TOKENIZER_MODES = ("auto", "slow")
EXECUTOR_BACKENDS = ("uni", "mp", "ray")
# Keys of config.json that may hold the context length, most specific first (vLLM's list).
_CONTEXT_LENGTH_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
    "model_max_length",
)


@dataclass(frozen=True)
class ModelConfig:
    model: str
    """What the user passed: a local folder, a .gguf file or a hub id."""
    model_path: str
    """The local folder holding config.json and the weights (a hub id resolved to its
    snapshot)."""
    gguf_file: str | None
    """The .gguf file when the model is one; config, tokenizer and weights come from it."""
    tokenizer: str
    """Folder or hub id of the tokenizer (defaults to the model's)."""
    tokenizer_mode: str
    """"auto" (fast tokenizer when there is one) or "slow"."""
    trust_remote_code: bool
    """Allow custom code from the model repository (off by default)."""
    revision: str | None
    """Hub revision (branch, tag or commit) of the model."""
    tokenizer_revision: str | None
    """Hub revision of the tokenizer."""
    skip_tokenizer_init: bool
    """Do not load a tokenizer; prompts must then be token ids and outputs have no text."""
    dtype: torch.dtype
    """Dtype of weights and activations, resolved from "auto" (see `resolve_dtype`)."""
    seed: int | None
    """Seed of the engine's random generator: same seed, same samples."""
    max_model_len: int
    """Longest sequence (prompt + output) in tokens."""
    max_logprobs: int
    """Largest `logprobs` / `prompt_logprobs` a request may ask for (-1: no limit)."""
    hf_config: PretrainedConfig = field(repr=False)
    """The model's config.json, read once."""

    @property
    def architecture(self) -> str:
        architectures = getattr(self.hf_config, "architectures", None) or []
        return architectures[0] if architectures else ""

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config.hidden_size)

    @property
    def num_hidden_layers(self) -> int:
        return int(self.hf_config.num_hidden_layers)

    @property
    def num_attention_heads(self) -> int:
        return int(self.hf_config.num_attention_heads)

    @property
    def num_key_value_heads(self) -> int:
        return int(getattr(self.hf_config, "num_key_value_heads", None) or self.num_attention_heads)

    @property
    def head_dim(self) -> int:
        head_dim = getattr(self.hf_config, "head_dim", None)
        return int(head_dim or self.hidden_size // self.num_attention_heads)


@dataclass(frozen=True)
class LoadConfig:
    load_format: str = "auto"
    """"auto" (safetensors if present, else .bin), "safetensors", "pt", "dummy" (random
    weights of the real shapes), "gguf", or "sharded_state"."""
    download_dir: str | None = None
    """Hub cache folder to download into and read from (default: the huggingface_hub one)."""


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV cache block."""
    enable_prefix_caching: bool = True
    """Share KV blocks between requests with the same prefix (by block hash)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU's total memory this engine may use (weights, activations, KV)."""
    kv_cache_memory_bytes: int | None = None
    """KV cache size in bytes; overrides gpu_memory_utilization and the CPU default."""
    cpu_kv_cache_bytes: int = 4 << 30
    """KV cache size on CPU (PAGEDLLM_CPU_KVCACHE_SPACE GiB, default 4)."""


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Number of ranks the model's layers are split across."""
    distributed_executor_backend: str = "uni"
    """"uni" (in-process, one rank), "mp" (one spawned process per rank) or "ray"."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    """Most requests in one step."""
    max_num_batched_tokens: int = 8192
    """Most tokens in one step; longer prompts are prefilled in chunks."""
    max_model_len: int = 2048
    """Longest sequence (prompt + output) in tokens."""


@dataclass(frozen=True)
class CompilationConfig:
    cudagraph_capture_sizes: tuple[int, ...] = ()
    """Decode batch sizes captured as CUDA graphs, ascending (empty: no graphs)."""
    use_cudagraph: bool = True
    """False when enforce_eager=True, on CPU, or when the mode turns graphs off."""

    @property
    def max_cudagraph_capture_size(self) -> int:
        return self.cudagraph_capture_sizes[-1] if self.cudagraph_capture_sizes else 0


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device = torch.device("cpu")
    """"cuda" when a GPU is visible, else "cpu" (or what `device=` names)."""


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    load_config: LoadConfig
    cache_config: CacheConfig
    parallel_config: ParallelConfig
    scheduler_config: SchedulerConfig
    compilation_config: CompilationConfig
    device_config: DeviceConfig

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: Any) -> EngineConfig:
        """Build and validate every config from `LLM(...)`'s keyword arguments."""
        from pagedllm.config_builder import build_engine_config

        return build_engine_config(model, kwargs)


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
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if config_dtype == torch.bfloat16 else torch.float32


def config_dtype_of(hf_config: PretrainedConfig) -> torch.dtype | None:
    value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(value, str):
        return _STR_TO_DTYPE.get(value)
    return value if isinstance(value, torch.dtype) else None


def derive_max_model_len(hf_config: PretrainedConfig) -> int:
    """The model's context length from config.json (the smallest of the keys present)."""
    lengths = [
        int(value)
        for key in _CONTEXT_LENGTH_KEYS
        if isinstance(value := getattr(hf_config, key, None), (int, float)) and value > 0
    ]
    return min(lengths) if lengths else 2048


def read_hf_config(model_path: str, gguf_file: str | None, trust_remote_code: bool, revision: str | None) -> PretrainedConfig:
    if gguf_file is not None:
        from pagedllm.model_loader.gguf import load_gguf_config

        return load_gguf_config(gguf_file)
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ValueError(f"model={model_path!r} has no config.json: pass a model folder or hub id.")
    return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code, revision=revision)


def replace(config: Any, **changes: Any) -> Any:
    """A copy of a frozen config with some fields changed (for tests and derived configs)."""
    return dataclasses.replace(config, **changes)


__all__ = [
    "CacheConfig",
    "CompilationConfig",
    "DeviceConfig",
    "EngineConfig",
    "LoadConfig",
    "ModelConfig",
    "ParallelConfig",
    "SchedulerConfig",
    "envs",
]
