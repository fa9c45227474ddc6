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
        """Build and validate every config from `LLM(...)`'s keyword arguments (vLLM's names).
        Unknown names are a TypeError; bad values a ValueError naming the option."""
        unknown = sorted(set(kwargs) - set(ENGINE_ARG_DEFAULTS))
        if unknown:
            raise TypeError(
                f"Unknown engine option(s) {', '.join(unknown)}; supported options: "
                f"{', '.join(sorted(ENGINE_ARG_DEFAULTS))}."
            )
        args = {**ENGINE_ARG_DEFAULTS, **kwargs}
        if model is None:
            from pagedllm.model_loader.default_model import default_model_path

            model = default_model_path()
        return _build(str(model), args)


# Every option LLM(...) takes, with its default. Options a vLLM user may pass that change
# nothing here (swap_space, disable_log_stats) are accepted so scripts run unchanged.
ENGINE_ARG_DEFAULTS: dict[str, Any] = {
    "tokenizer": None,
    "tokenizer_mode": "auto",
    "skip_tokenizer_init": False,
    "trust_remote_code": False,
    "tensor_parallel_size": 1,
    "distributed_executor_backend": None,
    "dtype": "auto",
    "quantization": None,
    "revision": None,
    "tokenizer_revision": None,
    "seed": 0,
    "gpu_memory_utilization": 0.9,
    "kv_cache_memory_bytes": None,
    "swap_space": None,
    "enforce_eager": False,
    "compilation_config": None,
    "max_model_len": None,
    "max_num_seqs": None,
    "max_num_batched_tokens": None,
    "enable_chunked_prefill": True,
    "block_size": None,
    "enable_prefix_caching": None,
    "load_format": "auto",
    "download_dir": None,
    "device": "auto",
    "max_logprobs": 20,
    "disable_log_stats": True,
}
# vLLM's default decode batch sizes for CUDA graphs: 1, 2, 4, then every 8 up to 512.
_DEFAULT_CAPTURE_SIZES = (1, 2, 4, *range(8, 513, 8))


def _build(model: str, args: dict[str, Any]) -> EngineConfig:
    from pagedllm.model_loader.discovery import resolve_model, resolve_tokenizer

    device = _resolve_device(args["device"])
    load_format = args["load_format"]
    _check_choice("load_format", load_format, LOAD_FORMATS)
    _check_choice("tokenizer_mode", args["tokenizer_mode"], TOKENIZER_MODES)
    if args["quantization"] is not None:
        raise ValueError(
            f"quantization={args['quantization']!r} is not supported yet; leave it None."
        )
    resolved = resolve_model(model, args["revision"], args["download_dir"], load_format)
    if resolved.gguf_file is not None and load_format not in ("auto", "gguf"):
        raise ValueError(f"model={model!r} is a GGUF file: use load_format='auto' or 'gguf', not {load_format!r}.")
    if resolved.gguf_file is None and load_format == "gguf":
        raise ValueError(f"load_format='gguf' needs model= to be a .gguf file, got {model!r}.")
    load_config = LoadConfig(
        load_format="gguf" if resolved.gguf_file else load_format,
        download_dir=args["download_dir"],
    )
    hf_config = read_hf_config(resolved.model_path, resolved.gguf_file, args["trust_remote_code"], args["revision"])
    model_config = _build_model_config(model, resolved, hf_config, args, device)
    scheduler_config = _build_scheduler_config(args, model_config.max_model_len, device)
    cache_config = _build_cache_config(args, device)
    parallel_config = _build_parallel_config(args, hf_config, device)
    if load_config.load_format == "sharded_state":
        from pagedllm.model_loader.sharded_state import check_sharded_state_folder

        check_sharded_state_folder(resolved.model_path, parallel_config.tensor_parallel_size)
    compilation_config = _build_compilation_config(args, device, scheduler_config.max_num_seqs)
    if args["tokenizer"] is not None and not args["skip_tokenizer_init"]:
        tokenizer = resolve_tokenizer(args["tokenizer"], args["tokenizer_revision"], args["download_dir"])
        model_config = dataclasses.replace(model_config, tokenizer=tokenizer)
    logger.info(
        "Model %s (%s): dtype %s, max_model_len %d, device %s, max_num_seqs %d, "
        "max_num_batched_tokens %d, block_size %d, prefix caching %s.",
        model, model_config.architecture, str(model_config.dtype).removeprefix("torch."),
        model_config.max_model_len, device, scheduler_config.max_num_seqs,
        scheduler_config.max_num_batched_tokens, cache_config.block_size,
        "on" if cache_config.enable_prefix_caching else "off",
    )
    return EngineConfig(
        model_config=model_config,
        load_config=load_config,
        cache_config=cache_config,
        parallel_config=parallel_config,
        scheduler_config=scheduler_config,
        compilation_config=compilation_config,
        device_config=DeviceConfig(device=device),
    )


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device={device!r} is not supported; use 'auto', 'cuda' or 'cpu'.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is visible; use device='cpu'.")
    return torch.device(device)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, choices))}.")


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _build_model_config(model: str, resolved: Any, hf_config: PretrainedConfig, args: dict[str, Any], device: torch.device) -> ModelConfig:
    dtype = resolve_dtype(args["dtype"], config_dtype_of(hf_config), device)
    if device.type == "cpu" and dtype == torch.float16:
        logger.warning("float16 is slow on CPU and may overflow; consider dtype='bfloat16' or 'float32'.")
    derived_len = derive_max_model_len(hf_config)
    max_model_len = args["max_model_len"]
    if max_model_len is None:
        max_model_len = derived_len
    else:
        max_model_len = _check_positive_int("max_model_len", max_model_len)
        if max_model_len > derived_len and not envs.allow_long_max_model_len():
            raise ValueError(
                f"max_model_len={max_model_len} is larger than the model's context length "
                f"({derived_len}, from its config.json); use max_model_len <= {derived_len}, or "
                "set PAGEDLLM_ALLOW_LONG_MAX_MODEL_LEN=1 if you know the model handles it."
            )
    seed = args["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}.")
    max_logprobs = args["max_logprobs"]
    if not isinstance(max_logprobs, int) or max_logprobs < -1:
        raise ValueError(f"max_logprobs must be -1 (no limit) or an integer >= 0, got {max_logprobs!r}.")
    tokenizer = resolved.model_path
    return ModelConfig(
        model=model,
        model_path=resolved.model_path,
        gguf_file=resolved.gguf_file,
        tokenizer=tokenizer,
        tokenizer_mode=args["tokenizer_mode"],
        trust_remote_code=bool(args["trust_remote_code"]),
        revision=args["revision"],
        tokenizer_revision=args["tokenizer_revision"],
        skip_tokenizer_init=bool(args["skip_tokenizer_init"]),
        dtype=dtype,
        seed=seed,
        max_model_len=max_model_len,
        max_logprobs=max_logprobs,
        hf_config=hf_config,
    )


def _build_scheduler_config(args: dict[str, Any], max_model_len: int, device: torch.device) -> SchedulerConfig:
    max_num_seqs = args["max_num_seqs"]
    max_num_seqs = 256 if max_num_seqs is None else _check_positive_int("max_num_seqs", max_num_seqs)
    max_num_batched_tokens = args["max_num_batched_tokens"]
    if max_num_batched_tokens is None:
        # Chunked prefill splits longer prompts, so this only bounds a step's activations.
        max_num_batched_tokens = 8192 if device.type == "cuda" else 4096
        if not args["enable_chunked_prefill"]:
            max_num_batched_tokens = max(max_num_batched_tokens, max_model_len)
    else:
        max_num_batched_tokens = _check_positive_int("max_num_batched_tokens", max_num_batched_tokens)
    if not args["enable_chunked_prefill"] and max_num_batched_tokens < max_model_len:
        raise ValueError(
            f"enable_chunked_prefill=False needs max_num_batched_tokens ({max_num_batched_tokens}) "
            f">= max_model_len ({max_model_len}); raise max_num_batched_tokens, lower "
            "max_model_len, or leave chunked prefill on."
        )
    return SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
    )


def _build_cache_config(args: dict[str, Any], device: torch.device) -> CacheConfig:
    block_size = args["block_size"]
    block_size = 16 if block_size is None else _check_positive_int("block_size", block_size)
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two (e.g. 16), got {block_size}.")
    utilization = args["gpu_memory_utilization"]
    if not isinstance(utilization, (int, float)) or not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization!r}.")
    kv_bytes = args["kv_cache_memory_bytes"]
    if kv_bytes is not None:
        kv_bytes = _check_positive_int("kv_cache_memory_bytes", kv_bytes)
    enable_prefix_caching = args["enable_prefix_caching"]
    return CacheConfig(
        block_size=block_size,
        enable_prefix_caching=True if enable_prefix_caching is None else bool(enable_prefix_caching),
        gpu_memory_utilization=float(utilization),
        kv_cache_memory_bytes=kv_bytes,
        cpu_kv_cache_bytes=envs.cpu_kvcache_space_bytes() if device.type == "cpu" else 0,
    )


def _build_parallel_config(args: dict[str, Any], hf_config: PretrainedConfig, device: torch.device) -> ParallelConfig:
    tp_size = _check_positive_int("tensor_parallel_size", args["tensor_parallel_size"])
    backend = args["distributed_executor_backend"]
    if backend is None:
        backend = "uni" if tp_size == 1 else "mp"
    _check_choice("distributed_executor_backend", backend, EXECUTOR_BACKENDS)
    if backend == "uni" and tp_size > 1:
        raise ValueError(
            f"distributed_executor_backend='uni' runs one rank in this process, but "
            f"tensor_parallel_size={tp_size}; use distributed_executor_backend='mp' (one process "
            "per rank, the default) or 'ray'."
        )
    if backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ValueError(
                "distributed_executor_backend='ray' needs the ray package: "
                "pip install 'pagedllm[ray]', or use distributed_executor_backend='mp'."
            )
    _check_tensor_parallel_split(hf_config, tp_size)
    if device.type == "cuda" and backend != "ray" and tp_size > torch.cuda.device_count():
        # Ray may place ranks on other machines; one host must see every rank's GPU.
        raise ValueError(
            f"tensor_parallel_size={tp_size} needs {tp_size} GPUs but "
            f"{torch.cuda.device_count()} are visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); lower tensor_parallel_size or "
            "use distributed_executor_backend='ray' across machines."
        )
    return ParallelConfig(tensor_parallel_size=tp_size, distributed_executor_backend=backend)


def _check_tensor_parallel_split(hf_config: PretrainedConfig, tp_size: int) -> None:
    """Fail at start-up, before any process starts, when the model's layers cannot be split
    into `tp_size` equal shards (the layers would only fail later, inside the workers)."""
    if tp_size == 1:
        return
    if getattr(hf_config, "num_attention_heads", None) is None:
        return  # not a decoder config this check understands; the layers check when built
    architecture = (getattr(hf_config, "architectures", None) or ["the model"])[0]
    num_heads = int(hf_config.num_attention_heads)
    num_kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or num_heads)
    sizes = {"num_attention_heads": num_heads}
    intermediate_size = getattr(hf_config, "intermediate_size", None)
    if isinstance(intermediate_size, int):
        sizes["intermediate_size"] = intermediate_size

    def splits(size: int) -> bool:
        return all(value % size == 0 for value in sizes.values()) and (
            num_kv_heads % size == 0 if size <= num_kv_heads else size % num_kv_heads == 0
        )

    bad = [(name, value) for name, value in sizes.items() if value % tp_size]
    kv_bad = num_kv_heads % tp_size if tp_size <= num_kv_heads else tp_size % num_kv_heads
    if not bad and not kv_bad:
        return
    working = [size for size in range(1, num_heads + 1) if splits(size)]
    if bad:
        name, value = bad[0]
        problem = f"{name} ({value}) of {architecture} is not divisible by tensor_parallel_size ({tp_size})"
    else:
        # Fewer KV heads than ranks is fine when each head is replicated a whole number of times.
        problem = (
            f"num_key_value_heads ({num_kv_heads}) of {architecture} and tensor_parallel_size "
            f"({tp_size}) do not divide one another"
        )
    raise ValueError(
        f"{problem}, so the model cannot be split across {tp_size} ranks; use "
        f"tensor_parallel_size in {working}."
    )


def _build_compilation_config(args: dict[str, Any], device: torch.device, max_num_seqs: int) -> CompilationConfig:
    raw = args["compilation_config"] or {}
    if isinstance(raw, int):
        raw = {"mode": raw}
    if not isinstance(raw, dict):
        raise ValueError(f"compilation_config must be a dict (e.g. {{'cudagraph_capture_sizes': [1, 2, 4]}}), got {raw!r}.")
    known = {"cudagraph_capture_sizes", "max_cudagraph_capture_size", "cudagraph_mode", "mode", "level"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"compilation_config has unknown key(s) {unknown}; known keys: {sorted(known)}.")
    mode = str(raw.get("cudagraph_mode", "FULL")).upper()
    if mode not in ("NONE", "FULL", "FULL_DECODE_ONLY", "PIECEWISE", "FULL_AND_PIECEWISE"):
        raise ValueError(f"compilation_config['cudagraph_mode']={mode!r}: use 'NONE' or 'FULL_DECODE_ONLY'.")
    use_cudagraph = device.type == "cuda" and not args["enforce_eager"] and mode != "NONE"
    max_size = raw.get("max_cudagraph_capture_size")
    sizes = raw.get("cudagraph_capture_sizes")
    if sizes is None:
        cap = min(max_num_seqs, max_size if max_size is not None else 512)
        sizes = [size for size in _DEFAULT_CAPTURE_SIZES if size <= cap]
    elif not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"compilation_config['cudagraph_capture_sizes'] must be positive integers, got {sizes!r}.")
    elif max_size is not None:
        sizes = [size for size in sizes if size <= max_size]
    return CompilationConfig(
        cudagraph_capture_sizes=tuple(sorted(set(sizes))) if use_cudagraph else (),
        use_cudagraph=use_cudagraph,
    )


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
    # transformers 5 calls it `dtype`; reading the old `torch_dtype` alias only warns.
    value = getattr(hf_config, "dtype", None) or vars(hf_config).get("torch_dtype")
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
