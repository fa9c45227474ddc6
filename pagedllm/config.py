"""Engine configuration: frozen dataclasses, one per part of the engine.

They are built and validated in one place, `EngineArgs.create_engine_config()`
(engine/arg_utils.py declares the options, engine/config_builder.py checks them and builds
these), and never mutated afterwards. Every field is documented where it is
declared. This module imports no other pagedllm module, so any module may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

def text_config_of(hf_config: PretrainedConfig) -> PretrainedConfig:
    """A multi-modal config's text_config (transformers' get_text_config), else the config."""
    get_text_config = getattr(hf_config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else hf_config


@dataclass(frozen=True)
class MultiModalConfig:
    modalities: tuple[str, ...] = ("image",)
    """The modalities the model takes (from its processor adapter)."""
    limit_per_prompt: dict[str, int] = field(default_factory=dict)
    """Most items of each modality one prompt may carry ("image", "video"); 0 turns a
    modality off (inputs rejected, nothing reserved for it at profiling). A modality the
    model supports but the user did not name gets vLLM's default, 999."""
    mm_processor_kwargs: dict[str, object] = field(default_factory=dict)
    """Keyword arguments of the model's image/video processor (e.g. max_pixels), overridable
    per request by the prompt's "mm_processor_kwargs"."""
    input_cache_bytes: int = 4 << 30
    """Bound of the processed-input cache (mm_processor_cache_gb, else
    PAGEDLLM_MM_INPUT_CACHE_GIB); 0 turns it off."""

    def limit_of(self, modality: str) -> int:
        return self.limit_per_prompt.get(modality, DEFAULT_MM_LIMIT)

    @property
    def is_text_only(self) -> bool:
        """Every modality of the model limited to 0: the vision tower is never built or loaded."""
        return all(self.limit_of(modality) == 0 for modality in self.modalities)


DEFAULT_MM_LIMIT = 999
"""vLLM's (V1) default number of items per modality per prompt."""


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
    quantization: str | None
    """The quantization method (a key of layers.quantization.QUANTIZATION_METHODS): from
    `quantization=` or the checkpoint's quantization_config; None for none."""
    hf_config: PretrainedConfig = field(repr=False)
    """The model's config.json, read once (with hf_overrides applied)."""
    generation_config: str = "auto"
    """"auto" (the model's generation_config.json), "vllm" (ignore its sampling fields) or a
    folder holding a generation_config.json."""
    override_generation_config: dict | None = None
    """Generation config fields that override the file's."""
    max_model_len_auto: bool = False
    """max_model_len="auto" (or -1): max_model_len is the model's until the KV cache is sized,
    then the engine lowers it to what one request can use (EngineCore)."""
    multimodal_config: MultiModalConfig | None = None
    """Limits and processor settings of a multi-modal model; None for text-only models."""

    @property
    def architecture(self) -> str:
        architectures = getattr(self.hf_config, "architectures", None) or []
        return architectures[0] if architectures else ""

    @property
    def text_config(self) -> PretrainedConfig:
        """The language model's config: hf_config itself, or a multi-modal model's text_config."""
        return text_config_of(self.hf_config)

    @property
    def vocab_size(self) -> int:
        return int(self.text_config.vocab_size)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def num_hidden_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_attention_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_key_value_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.num_attention_heads)

    @property
    def head_dim(self) -> int:
        head_dim = getattr(self.text_config, "head_dim", None)
        return int(head_dim or self.hidden_size // self.num_attention_heads)


@dataclass(frozen=True)
class LoadConfig:
    load_format: str = "auto"
    """"auto" (safetensors if present, else .bin), "safetensors", "pt", "dummy" (random
    weights of the real shapes), "gguf", or "sharded_state"."""
    download_dir: str | None = None
    """Hub cache folder to download into and read from (default: the huggingface_hub one)."""
    cpu_offload_bytes: int = 0
    """Bytes of weights kept in pinned host memory and copied to the GPU per layer at each
    forward (cpu_offload_gb)."""
    sharded_state_pattern: str | None = None
    """The file names of a sharded state (model_loader_extra_config's "pattern"); None: the
    one its sharded_state.json records, else model-rank-{rank}-part-{part}.safetensors."""


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
    kv_cache_headroom: float = 0.1
    """The KV cache holds at most max_num_seqs x max_model_len tokens plus this fraction of
    them (for prefix-cache reuse); a budget beyond that stays free."""
    cache_dtype: str = "auto"
    """KV cache element type: "auto" (the model dtype) or "fp8" (float8_e4m3fn with per-layer
    key and value scales from the checkpoint, else 1.0)."""
    num_gpu_blocks: int | None = None
    """The KV cache's blocks once the engine has sized it (vLLM's name, on CPU too); None in
    the config the engine starts from."""
    num_gpu_blocks_override: int | None = None
    """Blocks to allocate instead of those the budget gives (vLLM's knob for tests that want a
    small cache, e.g. to force preemption); on CPU too."""

    def element_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's element type for a model computing in `model_dtype` (what the
        engine allocates and what the memory plan counts)."""
        return torch.float8_e4m3fn if self.cache_dtype == "fp8" else model_dtype


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Number of ranks the model's layers are split across."""
    distributed_executor_backend: str = "uni"
    """"uni" (in-process, one rank), "mp" (one process per rank) or "ray"."""
    disable_custom_all_reduce: bool = False
    """True: every all-reduce goes through NCCL; False: small ones (decode) use the one-shot
    peer-to-peer kernel over symmetric memory when the GPUs support it."""

    @property
    def pipeline_parallel_size(self) -> int:
        """vLLM's: always 1 here (no pipeline parallelism)."""
        return 1

    @property
    def world_size(self) -> int:
        """vLLM's: the ranks of one engine (tensor x pipeline parallel)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    """Most requests in one step."""
    max_num_batched_tokens: int = 8192
    """Most tokens in one step; longer prompts are prefilled in chunks."""
    max_model_len: int = 2048
    """Longest sequence (prompt + output) in tokens."""
    async_scheduling: bool = False
    """Schedule and prepare step N+1 while step N runs; sampled token ids feed the next step on
    the device and reach the host one step later (EngineArgs turns it on by default)."""


@dataclass(frozen=True)
class CompilationConfig:
    cudagraph_capture_sizes: tuple[int, ...] = ()
    """Decode batch sizes captured as CUDA graphs, ascending (empty: no graphs)."""
    use_cudagraph: bool = True
    """False when enforce_eager=True, on CPU, or when the mode turns graphs off."""
    max_seq_len_to_capture: int = 1 << 62
    """Decode steps whose longest sequence exceeds this run eagerly."""

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


__all__ = [
    "CacheConfig",
    "CompilationConfig",
    "DeviceConfig",
    "EngineConfig",
    "LoadConfig",
    "ModelConfig",
    "MultiModalConfig",
    "ParallelConfig",
    "SchedulerConfig",
]
