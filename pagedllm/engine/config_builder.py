"""Turns `EngineArgs`' values into the frozen configs of config.py, validating each option once:
a bad value is a ValueError naming the option, the value given and what would work. Reads the
model's config.json (or GGUF metadata) once, resolves the model and tokenizer locations, and
derives what the options leave open (dtype, max_model_len, batch sizes, graph sizes)."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from transformers import PretrainedConfig

from pagedllm import envs
from pagedllm.config import (
    CacheConfig,
    CompilationConfig,
    DeviceConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from pagedllm.engine.hf_config import (
    apply_hf_overrides,
    config_dtype_of,
    derive_max_model_len,
    read_hf_config,
    resolve_dtype,
)
from pagedllm.engine.load_config_builder import build_load_config, check_sharded_state
from pagedllm.engine.multimodal_config_builder import build_multimodal_config
from pagedllm.engine.tensor_parallel_split import check_tensor_parallel_split

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy", "gguf", "sharded_state")
TOKENIZER_MODES = ("auto", "slow")
GENERATION_CONFIG_MODES = ("auto", "vllm")
EXECUTOR_BACKENDS = ("uni", "mp", "ray")


# vLLM's default decode batch sizes for CUDA graphs: 1, 2, 4, then every 8 up to 512.
_DEFAULT_CAPTURE_SIZES = (1, 2, 4, *range(8, 513, 8))


def build_engine_config(model: str, args: dict[str, Any], planned_device: torch.device | None = None) -> EngineConfig:
    from pagedllm.model_loader.discovery import resolve_model, resolve_tokenizer

    device = planned_device or _resolve_device(args["device"])
    load_format = args["load_format"]
    _check_choice("load_format", load_format, LOAD_FORMATS)
    _check_structured_outputs_config(args["structured_outputs_config"])
    if args["tokenizer_mode"] == "mistral":
        raise ValueError(
            "tokenizer_mode='mistral' (mistral_common's tekken tokenizer) is not supported; use "
            "tokenizer_mode='auto' with a checkpoint that ships a Hugging Face tokenizer."
        )
    _check_choice("tokenizer_mode", args["tokenizer_mode"], TOKENIZER_MODES)
    resolved = resolve_model(model, args["revision"], args["download_dir"], load_format)
    load_config = build_load_config(model, resolved, args, device)
    hf_config = read_hf_config(resolved.model_path, resolved.gguf_file, args["trust_remote_code"], args["revision"])
    hf_config = apply_hf_overrides(hf_config, args["hf_overrides"])
    model_config = _build_model_config(model, resolved, hf_config, args, device)
    scheduler_config = _build_scheduler_config(args, model_config.max_model_len, device)
    cache_config = _build_cache_config(args, device)
    parallel_config = _build_parallel_config(args, hf_config, device, check_visible_gpus=planned_device is None)
    check_sharded_state(load_config, resolved.model_path, parallel_config.tensor_parallel_size, model_config.quantization)
    compilation_config = _build_compilation_config(args, device, scheduler_config.max_num_seqs, model_config.max_model_len)
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
    # device_count() asks NVML where it can; is_available() asks the CUDA runtime, after which
    # forked ranks could not use CUDA (executor/multiproc.py).
    if device == "auto":
        return torch.device("cuda" if torch.cuda.device_count() > 0 else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device={device!r} is not supported; use 'auto', 'cuda' or 'cpu'.")
    if device.startswith("cuda") and torch.cuda.device_count() == 0:
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
    max_model_len_auto = max_model_len == "auto" or (max_model_len == -1 and not isinstance(max_model_len, bool))
    if max_model_len is None or max_model_len_auto:
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
    from pagedllm.layers.quantization import resolve_quantization

    quantization = resolve_quantization(args["quantization"], hf_config)
    multimodal_config = build_multimodal_config(args, hf_config)
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
        quantization=quantization,
        hf_config=hf_config,
        max_model_len_auto=max_model_len_auto,
        generation_config=_check_generation_config(args["generation_config"]),
        override_generation_config=args["override_generation_config"],
        multimodal_config=multimodal_config,
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
    async_scheduling = args["async_scheduling"]
    return SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        async_scheduling=True if async_scheduling is None else bool(async_scheduling),
    )


# kv_cache_dtype values (vLLM's names); "fp8" means float8_e4m3fn.
_KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def _build_cache_config(args: dict[str, Any], device: torch.device) -> CacheConfig:
    block_size = args["block_size"]
    block_size = 16 if block_size is None else _check_positive_int("block_size", block_size)
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two (e.g. 16), got {block_size}.")
    swap_space = args["swap_space"]
    if swap_space is not None and (isinstance(swap_space, bool) or not isinstance(swap_space, (int, float))
                                   or swap_space < 0):
        raise ValueError(f"swap_space must be a number of GiB >= 0 (pagedllm recomputes instead of swapping), "
                         f"got {swap_space!r}.")
    utilization = args["gpu_memory_utilization"]
    if not isinstance(utilization, (int, float)) or not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization!r}.")
    kv_bytes = args["kv_cache_memory_bytes"]
    if kv_bytes is not None:
        kv_bytes = _check_positive_int("kv_cache_memory_bytes", kv_bytes)
    blocks_override = args["num_gpu_blocks_override"]
    if blocks_override is not None:
        blocks_override = _check_positive_int("num_gpu_blocks_override", blocks_override)
    enable_prefix_caching = args["enable_prefix_caching"]
    headroom = args["kv_cache_headroom"]
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0.0 <= headroom:
        raise ValueError(f"kv_cache_headroom must be a fraction >= 0 (e.g. 0.1), got {headroom!r}.")
    cache_dtype = str(args["kv_cache_dtype"]).lower()
    if cache_dtype not in _KV_CACHE_DTYPES:
        why = " (the e5m2 format is not implemented: 'fp8' is e4m3 with per-layer scales)" if "e5m2" in cache_dtype else ""
        raise ValueError(
            f"kv_cache_dtype={args['kv_cache_dtype']!r} is not supported{why}; use one of "
            f"{', '.join(map(repr, _KV_CACHE_DTYPES))}."
        )
    if args["calculate_kv_scales"]:
        raise ValueError(
            "calculate_kv_scales=True is not supported: an fp8 KV cache takes its scales from the checkpoint "
            "(k_scale / v_scale, else 1.0); pass calculate_kv_scales=False."
        )
    return CacheConfig(
        cache_dtype="auto" if cache_dtype == "auto" else "fp8",
        block_size=block_size,
        enable_prefix_caching=True if enable_prefix_caching is None else bool(enable_prefix_caching),
        gpu_memory_utilization=float(utilization),
        kv_cache_memory_bytes=kv_bytes,
        num_gpu_blocks_override=blocks_override,
        cpu_kv_cache_bytes=envs.cpu_kvcache_space_bytes() if device.type == "cpu" else 0,
        kv_cache_headroom=float(headroom),
    )


def _build_parallel_config(
    args: dict[str, Any], hf_config: PretrainedConfig, device: torch.device, check_visible_gpus: bool = True
) -> ParallelConfig:
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
    check_tensor_parallel_split(hf_config, tp_size)
    if check_visible_gpus and device.type == "cuda" and backend != "ray" and tp_size > torch.cuda.device_count():
        # Ray may place ranks on other machines; one host must see every rank's GPU.
        raise ValueError(
            f"tensor_parallel_size={tp_size} needs {tp_size} GPUs but "
            f"{torch.cuda.device_count()} are visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); lower tensor_parallel_size or "
            "use distributed_executor_backend='ray' across machines."
        )
    return ParallelConfig(
        tensor_parallel_size=tp_size,
        distributed_executor_backend=backend,
        disable_custom_all_reduce=bool(args["disable_custom_all_reduce"]),
    )



# vLLM CompilationConfig fields about torch.compile and its passes: accepted, no effect here.
_VLLM_COMPILATION_ONLY_KEYS = frozenset({
    "backend", "custom_ops", "splitting_ops", "use_inductor", "compile_sizes", "inductor_compile_config",
    "inductor_passes", "cudagraph_num_of_warmups", "cudagraph_copy_inputs", "full_cuda_graph", "pass_config",
    "debug_dump_path", "cache_dir", "compile_cache_save_format", "use_inductor_graph_partition",
    "cudagraph_specialize_lora", "local_cache_dir",
})


def _build_compilation_config(args: dict[str, Any], device: torch.device, max_num_seqs: int, max_model_len: int) -> CompilationConfig:
    raw = args["compilation_config"] or {}
    if isinstance(raw, int):
        raw = {"mode": raw}
    if isinstance(raw, CompilationConfig):  # this package's class, as vLLM takes its own
        raw = {"cudagraph_mode": "FULL" if raw.use_cudagraph else "NONE",
               **({"cudagraph_capture_sizes": list(raw.cudagraph_capture_sizes)} if raw.cudagraph_capture_sizes else {})}
    if not isinstance(raw, dict):
        raise ValueError(f"compilation_config must be a dict (e.g. {{'cudagraph_capture_sizes': [1, 2, 4]}}), got {raw!r}.")
    if args["cudagraph_capture_sizes"] is not None:
        if "cudagraph_capture_sizes" in raw:
            raise ValueError(
                "cudagraph_capture_sizes is given both as an option and in compilation_config; pass it once."
            )
        raw = {**raw, "cudagraph_capture_sizes": args["cudagraph_capture_sizes"]}
    max_seq_len_to_capture = args["max_seq_len_to_capture"]
    if max_seq_len_to_capture is None:
        max_seq_len_to_capture = max_model_len
    else:
        max_seq_len_to_capture = min(_check_positive_int("max_seq_len_to_capture", max_seq_len_to_capture), max_model_len)
    known = {"cudagraph_capture_sizes", "max_cudagraph_capture_size", "cudagraph_mode", "mode", "level"}
    ignored = sorted(set(raw) & _VLLM_COMPILATION_ONLY_KEYS)
    if ignored:
        # vLLM's torch.compile settings: pagedllm's step runs Triton kernels and CUDA graphs.
        logger.info("compilation_config: %s do not apply here (no torch.compile) and are ignored.", ignored)
    unknown = sorted(set(raw) - known - _VLLM_COMPILATION_ONLY_KEYS)
    if unknown:
        raise ValueError(f"compilation_config has unknown key(s) {unknown}; known keys: {sorted(known)}.")
    mode = str(raw.get("cudagraph_mode", "FULL")).upper()
    if mode not in ("NONE", "FULL", "FULL_DECODE_ONLY", "PIECEWISE", "FULL_AND_PIECEWISE"):
        raise ValueError(f"compilation_config['cudagraph_mode']={mode!r}: use 'NONE' or 'FULL_DECODE_ONLY'.")
    # Offloaded weights are copied in per forward at new addresses, which a graph cannot follow.
    use_cudagraph = device.type == "cuda" and not args["enforce_eager"] and mode != "NONE" and not args["cpu_offload_gb"]
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
        max_seq_len_to_capture=max_seq_len_to_capture,
    )


def _check_structured_outputs_config(config: Any) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        raise ValueError(f"structured_outputs_config must be a dict like {{'backend': 'xgrammar'}}, got {config!r}.")
    backend = config.get("backend", "auto")
    if backend not in ("auto", "xgrammar"):
        raise ValueError(
            f"structured_outputs_config backend={backend!r} is not available; use 'auto' or 'xgrammar'."
        )


def _check_generation_config(value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not value:
        raise ValueError(
            f"generation_config must be 'auto', 'vllm' or a folder holding generation_config.json, got {value!r}."
        )
    value = os.fspath(value)
    if value not in GENERATION_CONFIG_MODES and not os.path.isdir(value):
        raise ValueError(
            f"generation_config={value!r} is neither 'auto', 'vllm' nor an existing folder; pass one of those."
        )
    return value
