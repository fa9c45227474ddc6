"""Environment variables, read here only. Each PAGEDLLM_* name also accepts the VLLM_* name
a vLLM user already sets (the PAGEDLLM_* one wins when both are set). Values are read when
asked for, so a variable set after import still counts."""

from __future__ import annotations

import os


def _get(name: str) -> str | None:
    value = os.environ.get(f"PAGEDLLM_{name}")
    if value is None:
        value = os.environ.get(f"VLLM_{name}")
    return value


def _get_bool(name: str, default: bool = False) -> bool:
    value = _get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def cpu_kvcache_space_bytes() -> int:
    """PAGEDLLM_CPU_KVCACHE_SPACE (alias VLLM_CPU_KVCACHE_SPACE): KV cache GiB on CPU, default 4."""
    value = _get("CPU_KVCACHE_SPACE")
    if value is None or value.strip() in ("", "0"):
        return 4 << 30
    try:
        gib = float(value)
    except ValueError:
        raise ValueError(
            f"PAGEDLLM_CPU_KVCACHE_SPACE={value!r} is not a number of GiB; set e.g. 4."
        ) from None
    if gib <= 0:
        raise ValueError(f"PAGEDLLM_CPU_KVCACHE_SPACE={value!r} must be a positive number of GiB.")
    return int(gib * (1 << 30))


def allow_long_max_model_len() -> bool:
    """PAGEDLLM_ALLOW_LONG_MAX_MODEL_LEN: accept a max_model_len above the model's context."""
    return _get_bool("ALLOW_LONG_MAX_MODEL_LEN")


def fuse_all_reduce_rms_norm() -> bool:
    """PAGEDLLM_FUSE_ALL_REDUCE_RMS_NORM (default on): with several GPUs, a decode step's
    all-reduces run fused with the residual add and RMSNorm after them (one kernel each);
    0 runs them as the one-shot all-reduce and then the norm, for comparison."""
    return _get_bool("FUSE_ALL_REDUCE_RMS_NORM", default=True)


def programmatic_dependent_launch() -> bool:
    """PAGEDLLM_PDL (default on): on Hopper and later GPUs the decode step's Triton kernels are
    launched with programmatic dependent launch (layers/ops/pdl.py); 0 launches them plainly.
    Read once per process and GPU, at the first such launch."""
    return _get_bool("PDL", default=True)


def hf_hub_offline() -> bool:
    """HF_HUB_OFFLINE (huggingface_hub's own variable): use only the local hub cache."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> str:
    """PAGEDLLM_CACHE_ROOT: where pagedllm keeps files it derives (default ~/.cache/pagedllm)."""
    value = _get("CACHE_ROOT")
    if value:
        return os.path.expanduser(value)
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(xdg, "pagedllm")


def logging_level() -> str:
    """PAGEDLLM_LOGGING_LEVEL: level of the pagedllm logger (default INFO)."""
    return (_get("LOGGING_LEVEL") or "INFO").upper()


def worker_multiproc_method() -> str | None:
    """PAGEDLLM_WORKER_MULTIPROC_METHOD (alias VLLM_WORKER_MULTIPROC_METHOD): how the "mp"
    executor starts its ranks, "fork" or "spawn"; unset: fork on GPUs, spawn on CPU."""
    value = (_get("WORKER_MULTIPROC_METHOD") or "").strip().lower()
    if value in ("", "fork", "spawn"):
        return value or None
    raise ValueError(f"PAGEDLLM_WORKER_MULTIPROC_METHOD={value!r} is not a start method; use 'fork' or 'spawn'.")


def torch_profiler_dir() -> str | None:
    """PAGEDLLM_TORCH_PROFILER_DIR (alias VLLM_TORCH_PROFILER_DIR): where LLM.start_profile()
    writes torch profiler traces; unset means profiling is off."""
    value = _get("TORCH_PROFILER_DIR")
    return os.path.abspath(os.path.expanduser(value)) if value else None


def api_key() -> str | None:
    """PAGEDLLM_API_KEY (alias VLLM_API_KEY): the bearer key `pagedllm serve` requires on /v1."""
    return _get("API_KEY") or None


def mm_input_cache_bytes() -> int:
    """PAGEDLLM_MM_INPUT_CACHE_GIB (alias VLLM_MM_INPUT_CACHE_GIB): bound of the processed
    multi-modal input cache in GiB, default 4; 0 turns the cache off."""
    value = _get("MM_INPUT_CACHE_GIB")
    if value is None or value.strip() == "":
        return 4 << 30
    try:
        gib = float(value)
    except ValueError:
        raise ValueError(f"PAGEDLLM_MM_INPUT_CACHE_GIB={value!r} is not a number of GiB; set e.g. 4 (0: off).") from None
    if gib < 0:
        raise ValueError(f"PAGEDLLM_MM_INPUT_CACHE_GIB={value!r} must be >= 0 GiB (0 turns the cache off).")
    return int(gib * (1 << 30))
