"""`EngineArgs`: every engine option once, with its type, default, help text and dashed flag.

`LLM(...)`, `pagedllm generate|chat|serve|plan` and `save-sharded` all build their
`EngineConfig` here, so an option is declared and validated in one place. Adding an option is
one field below (its `help` metadata becomes the `--flag`'s help) and, where it needs checking,
a line in the matching `build_*` function of engine/config_builder.py, which turns these values
into the frozen configs of config.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedllm.config import EngineConfig
from pagedllm.engine.config_builder import build_engine_config

logger = logging.getLogger(__name__)


# vLLM options for features pagedllm does not have: the values that leave the feature off are
# accepted (and change nothing), as a vLLM user may spell them out.
VLLM_DEFAULT_ONLY_OPTIONS: dict[str, tuple[tuple[Any, ...], str]] = {
    "pipeline_parallel_size": ((1,), "no pipeline parallelism; use tensor_parallel_size"),
    "data_parallel_size": ((1,), "no data parallelism: start one engine per replica"),
    "enable_lora": ((False,), "no LoRA adapters"),
    "speculative_config": ((None,), "no speculative decoding"),
    "scheduling_policy": (("fcfs",), "first come, first served only"),
    "kv_transfer_config": ((None,), "no disaggregated prefill"),
    "enable_prompt_embeds": ((False,), "prompts are text or token ids"),
    "disable_sliding_window": ((False,), "sliding-window layers keep their window"),
    "logprobs_mode": (("raw_logprobs",), "logprobs are the model's raw log-softmax"),
    "model_impl": (("auto", "vllm"), "pagedllm's own model files"),
    "runner": (("auto", "generate"), "generative models only"),
    "task": (("auto", "generate"), "generative models only"),
    "code_revision": ((None,), "remote code comes with the model's revision"),
    "hf_token": ((None,), "the hub token comes from HF_TOKEN or huggingface-cli login"),
    "logits_processors": ((None,), "give logits_processors per request in SamplingParams"),
}

# vLLM's short forms of its flags.
_SHORT_FLAGS = {"tensor_parallel_size": ("-tp",), "quantization": ("-q",), "compilation_config": ("-O",),
                "pipeline_parallel_size": ("-pp",), "data_parallel_size": ("-dp",)}


def _check_default_only(name: str, value: Any) -> None:
    accepted, feature = VLLM_DEFAULT_ONLY_OPTIONS[name]
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported ({feature}); leave it out or pass "
                         f"{' / '.join(map(repr, accepted))}.")


def _add_default_only_flags(parser: argparse.ArgumentParser) -> None:
    """vLLM's flags of features pagedllm lacks, so a ported command line parses: each is
    accepted at the value that leaves its feature off."""
    group = parser.add_argument_group("vLLM options of features pagedllm lacks (only their 'off' values)")
    for name, (accepted, feature) in VLLM_DEFAULT_ONLY_OPTIONS.items():
        flags = ["--" + name.replace("_", "-"), *_SHORT_FLAGS.get(name, ())]
        example = accepted[0]
        help_text = f"{feature}: {' / '.join(map(repr, accepted))}"
        if isinstance(example, bool):
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            reader = int if isinstance(example, int) else _json_value if name.endswith("_config") else str
            group.add_argument(*flags, type=reader, default=None, help=help_text, metavar=name.upper())


def _option(default: Any, help: str, cli_type: Any = None, **extra: Any) -> Any:
    """A field of EngineArgs: `help` is the flag's help; `cli_type` how the flag's text is read
    (default: the type of the default; "json" for dicts; bool flags get --x / --no-x)."""
    return field(default=default, metadata={"help": help, "cli_type": cli_type, **extra})


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({error.msg})") from None


# vLLM's human-readable lengths: lower-case suffixes are powers of 1000, upper-case of 1024.
_DECIMAL_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9}
_BINARY_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _human_int(text: str) -> int:
    """An integer, or vLLM's human-readable form: '32k' (32,000), '32K' (32,768), '25.6k'
    (25,600), '4M' (4 MiB) for lengths, token counts and byte sizes."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    suffix, number = text[-1:], text[:-1]
    try:
        if suffix in _BINARY_SUFFIXES:
            return int(number) * _BINARY_SUFFIXES[suffix]
        if suffix in _DECIMAL_SUFFIXES:
            value = float(number) * _DECIMAL_SUFFIXES[suffix]
            if value == int(value):
                return int(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a whole number: give an integer, or one with k/m/g (x1000) or K/M/G (x1024), e.g. 32k"
    )


def _max_model_len_value(text: str) -> int | str:
    """'auto', -1, or a length as _human_int reads it."""
    return "auto" if text.strip().lower() == "auto" else _human_int(text)


def _mm_limits_value(text: str) -> Any:
    """--limit-mm-per-prompt takes JSON ('{"image": 3}') or vLLM's older 'image=3,video=1'."""
    if text.lstrip().startswith("{"):
        return _json_value(text)
    try:
        return {key.strip(): int(value) for key, value in (pair.split("=") for pair in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither JSON nor 'image=3,video=1'") from None


@dataclass
class EngineArgs:
    """The options of `LLM(...)` with vLLM's names and defaults. `None` means "derive it" (from
    the model, the device, or another option)."""

    model: str | None = _option(None, "model folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct)", str)
    tokenizer: str | None = _option(None, "tokenizer folder or hub id (default: the model's)", str)
    tokenizer_mode: str = _option("auto", "'auto' (fast tokenizer when there is one) or 'slow'", str)
    skip_tokenizer_init: bool = _option(False, "no tokenizer: prompts must be token ids, outputs carry no text")
    trust_remote_code: bool = _option(False, "allow custom code from the model repository")
    tensor_parallel_size: int = _option(1, "number of devices (GPUs or CPU processes) the layers are split across")
    distributed_executor_backend: str | None = _option(None, "uni | mp | ray (default: uni for 1 rank, mp for more)", str)
    dtype: str = _option("auto", "auto | float32 | bfloat16 | float16", str)
    quantization: str | None = _option(None, "quantization method (default: from the checkpoint's quantization_config)", str)
    revision: str | None = _option(None, "hub revision (branch, tag or commit) of the model", str)
    tokenizer_revision: str | None = _option(None, "hub revision of the tokenizer", str)
    seed: int | None = _option(0, "engine random seed: same seed, same samples", int)
    gpu_memory_utilization: float = _option(0.9, "fraction of GPU memory this engine may use")
    kv_cache_memory_bytes: int | None = _option(None, "KV cache size in bytes (overrides gpu_memory_utilization; 4G = 4 GiB)", "human_int")
    num_gpu_blocks_override: int | None = _option(None, "KV cache blocks to allocate, whatever the memory budget gives (vLLM's testing knob)", int)
    kv_cache_headroom: float = _option(0.1, "KV cache beyond max_num_seqs x max_model_len tokens, as a fraction of them (prefix-cache reuse); the rest of the budget stays free")
    kv_cache_dtype: str = _option("auto", "auto (the model dtype) | fp8 | fp8_e4m3: KV cache element type", str)
    calculate_kv_scales: bool = _option(False, "accepted for vLLM compatibility when False: fp8 KV scales come from the checkpoint (else 1.0)")
    swap_space: float | None = _option(None, "accepted for vLLM compatibility; pagedllm recomputes instead of swapping", float)
    enforce_eager: bool = _option(False, "no CUDA graphs")
    compilation_config: dict[str, Any] | int | None = _option(None, "CUDA graph settings as JSON, e.g. '{\"cudagraph_capture_sizes\": [1, 2, 4]}'", "json")
    max_model_len: int | str | None = _option(None, "longest sequence (prompt + output) in tokens (default: the model's; 'auto' or -1: the longest the KV cache holds)", "max_model_len")
    max_num_seqs: int | None = _option(None, "most requests in one step (default 256)", int)
    max_num_batched_tokens: int | None = _option(None, "most tokens in one step (default 8192 on GPU, 4096 on CPU; 8k = 8,000)", "human_int")
    enable_chunked_prefill: bool = _option(True, "split long prompts into chunks of max_num_batched_tokens")
    async_scheduling: bool | None = _option(None, "schedule step N+1 while step N runs; sampled ids reach the host one step later (default on)", bool)
    disable_custom_all_reduce: bool = _option(False, "use NCCL for every all-reduce, not the peer-to-peer one-shot kernel for small ones")
    block_size: int | None = _option(None, "tokens per KV cache block (power of two, default 16)", int)
    enable_prefix_caching: bool | None = _option(None, "share KV blocks of common prefixes (default on)", bool)
    load_format: str = _option("auto", "auto | safetensors | pt | dummy | gguf | sharded_state", str)
    download_dir: str | None = _option(None, "hub cache folder to read and download into", str)
    model_loader_extra_config: dict | None = _option(None, "the loader's extra settings: {'pattern': ...} names a sharded state's files (load_format='sharded_state')", "json")
    device: str = _option("auto", "auto | cuda | cpu", str)
    max_logprobs: int = _option(20, "largest logprobs / prompt_logprobs a request may ask for (-1: no limit)")
    disable_log_stats: bool = _option(True, "accepted for vLLM compatibility")
    # vLLM's everyday options (offline-api issue); see README.md.
    generation_config: str = _option("auto", "'auto' (the model's generation_config.json sets the default sampling and EOS ids), 'vllm' (ignore its sampling fields), or a folder holding one", str)
    override_generation_config: dict[str, Any] | None = _option(None, "generation config fields that override the file's, as JSON, e.g. '{\"temperature\": 0.5}'", "json")
    hf_overrides: Any = _option(None, "dict merged into the model's config.json (or, from Python, a callable config -> config)", "json")
    max_seq_len_to_capture: int | None = _option(None, "longest sequence a decode CUDA graph runs; longer ones run eagerly (default max_model_len)", int)
    cudagraph_capture_sizes: list[int] | None = _option(None, "decode batch sizes captured as CUDA graphs, as JSON, e.g. '[1, 2, 4]' (same as compilation_config's key)", "json")
    cpu_offload_gb: float = _option(0.0, "GiB of weights kept in pinned host memory and streamed to the GPU per layer at each forward", float)
    enable_sleep_mode: bool = _option(False, "accepted for vLLM compatibility: LLM.sleep() / wake_up() always work")
    structured_outputs_config: dict[str, Any] | None = _option(None, "structured outputs settings as JSON; backend 'auto' or 'xgrammar' (the one backend)", "json")
    limit_mm_per_prompt: dict[str, int] | None = _option(None, "most multi-modal items per prompt, per modality, as JSON, e.g. '{\"image\": 3, \"video\": 0}' (default 999 each; 0 turns a modality off)", _mm_limits_value)
    mm_processor_kwargs: dict[str, Any] | None = _option(None, "multi-modal processor arguments as JSON, e.g. '{\"max_pixels\": 602112}' (a prompt's own mm_processor_kwargs override them)", "json")
    mm_processor_cache_gb: float | None = _option(None, "GiB of processed multi-modal inputs kept for reuse; 0 turns the cache off (default: PAGEDLLM_MM_INPUT_CACHE_GIB, else 4)", float)

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: Any) -> EngineArgs:
        """`LLM(...)`'s keyword arguments; an unknown name is a TypeError listing the known.
        vLLM options for features pagedllm lacks are accepted at the values that turn the
        feature off (VLLM_DEFAULT_ONLY_OPTIONS); any other value is a ValueError."""
        for name in sorted(set(kwargs) & set(VLLM_DEFAULT_ONLY_OPTIONS)):
            _check_default_only(name, kwargs.pop(name))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(
                f"Unknown engine option(s) {', '.join(unknown)}; supported options: "
                f"{', '.join(sorted(names))}."
            )
        return cls(model=model, **kwargs)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        """One `--dashed-name` flag per option (default None: "not given"), and vLLM's flags of
        the features pagedllm lacks (VLLM_DEFAULT_ONLY_OPTIONS, checked as LLM(...) checks
        them). Returns the parser, as vLLM's does."""
        _add_default_only_flags(parser)
        group = parser.add_argument_group("engine options (LLM(...) keyword arguments)")
        for option in dataclasses.fields(cls):
            if option.name in exclude:
                continue
            flags = ["--" + option.name.replace("_", "-"), *_SHORT_FLAGS.get(option.name, ())]
            help_text = option.metadata.get("help", "")
            cli_type = option.metadata.get("cli_type") or type(option.default)
            if cli_type is bool:
                group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                reader = {"json": _json_value, "max_model_len": _max_model_len_value, "human_int": _human_int}.get(
                    cli_type, cli_type)
                group.add_argument(*flags, type=reader, default=None, help=help_text, metavar=option.name.upper())
        return parser

    @classmethod
    def from_cli_args(cls, namespace: argparse.Namespace) -> EngineArgs:
        """The options given on the command line; the others keep their defaults."""
        return cls(**cls.given_cli_options(namespace))

    @classmethod
    def given_cli_options(cls, namespace: argparse.Namespace) -> dict[str, Any]:
        """The engine options of `add_cli_args` that the command line gave, by name (vLLM's
        flags of features pagedllm lacks are checked here, then dropped)."""
        for name in VLLM_DEFAULT_ONLY_OPTIONS:
            if getattr(namespace, name, None) is not None:
                _check_default_only(name, getattr(namespace, name))
        return {
            option.name: getattr(namespace, option.name)
            for option in dataclasses.fields(cls)
            if getattr(namespace, option.name, None) is not None
        }

    def _option_values(self) -> dict[str, Any]:
        """Each option's value as given (not dataclasses.asdict, which would turn a
        CompilationConfig passed as compilation_config into a dict)."""
        return {option.name: getattr(self, option.name) for option in dataclasses.fields(self)}

    def create_engine_config(self) -> EngineConfig:
        """Builds and validates every config; a bad value is a ValueError naming the option."""
        model = self.model
        if model is None:
            from pagedllm.model_loader.default_model import default_model_path

            model = default_model_path()
        return build_engine_config(str(model), self._option_values())

    def create_planning_config(self, device: str = "cuda") -> EngineConfig:
        """The config an engine on `device` ("cuda" or "cpu") would get, built on any machine
        for `pagedllm plan`: no GPU is touched, and a hub model's weights are not downloaded
        (only its config.json)."""
        model = self.model
        if model is None:
            from pagedllm.model_loader.default_model import default_model_path

            model = default_model_path()
        args = self._option_values()
        if not os.path.exists(str(model)):
            args["load_format"] = "dummy"
        return build_engine_config(str(model), args, planned_device=torch.device(device))


# vLLM's name for the options of its asynchronous engine; pagedllm's are the same options.
AsyncEngineArgs = EngineArgs
