"""The table of vLLM's offline API and what pagedllm does with each name, generated from the
code so it cannot drift: `python -m pagedllm.entrypoints.api_table` prints it, `--write
README.md` updates the committed copy (a test checks the two are equal).

A name is "supported" when pagedllm has it (a SamplingParams field, an LLM method, an
EngineArgs option, an output field) and no note below says otherwise; a name pagedllm lacks
is "refused" (TypeError for an unknown option or field, AttributeError for a method)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

# vLLM 0.33's names (vllm/sampling_params.py, vllm/entrypoints/llm.py, vllm/engine/arg_utils.py,
# vllm/outputs.py), the single-node, offline subset.
VLLM_SAMPLING_PARAMS = (
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k",
    "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
    "prompt_logprobs", "flat_logprobs", "detokenize", "skip_special_tokens", "spaces_between_special_tokens",
    "logits_processors", "include_stop_str_in_output", "truncate_prompt_tokens", "output_kind", "skip_clone",
    "structured_outputs", "guided_decoding", "logit_bias", "allowed_token_ids", "extra_args", "bad_words",
    "skip_reading_prefix_cache", "logprob_token_ids",
)
VLLM_LLM_METHODS = (
    "generate", "chat", "beam_search", "enqueue", "wait_for_completion", "get_tokenizer", "set_tokenizer",
    "get_default_sampling_params", "collective_rpc", "apply_model", "reset_prefix_cache", "reset_mm_cache",
    "sleep", "wake_up", "get_metrics", "start_profile", "stop_profile", "preprocess_chat", "encode", "embed",
    "classify", "score", "reward",
)
VLLM_ENGINE_OPTIONS = (
    "model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code", "download_dir",
    "load_format", "dtype", "kv_cache_dtype", "calculate_kv_scales", "seed", "max_model_len", "distributed_executor_backend",
    "pipeline_parallel_size", "tensor_parallel_size", "data_parallel_size", "block_size",
    "enable_prefix_caching", "swap_space", "cpu_offload_gb", "gpu_memory_utilization",
    "kv_cache_memory_bytes", "max_num_batched_tokens", "max_num_seqs", "max_logprobs", "disable_log_stats",
    "revision", "code_revision", "tokenizer_revision", "hf_token", "hf_overrides", "quantization",
    "enforce_eager", "max_seq_len_to_capture", "disable_custom_all_reduce", "limit_mm_per_prompt",
    "mm_processor_kwargs", "enable_lora", "enable_chunked_prefill", "speculative_config",
    "served_model_name", "generation_config", "override_generation_config", "enable_sleep_mode",
    "compilation_config", "cudagraph_capture_sizes", "structured_outputs_config", "async_scheduling",
    "scheduling_policy", "kv_transfer_config", "logits_processors", "enable_prompt_embeds", "device",
    "max_parallel_loading_workers", "disable_sliding_window", "logprobs_mode", "model_impl", "runner",
    "mm_processor_cache_gb", "num_gpu_blocks_override", "model_loader_extra_config",
)
VLLM_REQUEST_OUTPUT_FIELDS = (
    "request_id", "prompt", "prompt_token_ids", "prompt_logprobs", "outputs", "finished", "metrics",
    "lora_request", "encoder_prompt", "encoder_prompt_token_ids", "num_cached_tokens",
    "multi_modal_placeholders", "kv_transfer_params",
)
VLLM_COMPLETION_OUTPUT_FIELDS = (
    "index", "text", "token_ids", "cumulative_logprob", "logprobs", "finish_reason", "stop_reason", "lora_request",
)

# Names pagedllm has but does not (fully) act on, and why. Everything else present is supported.
NOTES: dict[str, dict[str, str]] = {
    "SamplingParams": {
        "flat_logprobs": "accepted, ignored: logprobs are always a list of dicts",
        "skip_clone": "accepted, ignored: cloning is cheap here",
        "output_kind": "supported (AsyncLLM, LLMEngine.step); LLM.generate returns whole outputs whatever the kind",
        "logprob_token_ids": "accepted as None only (not implemented); other values: ValueError",
        "extra_args": "accepted, carried along, unused (for extensions)",
        "logits_processors": "supported in-process (executor 'uni'); elsewhere a ValueError (callables do not cross processes)",
        "guided_decoding": "supported: the old name of structured_outputs",
    },
    "LLM": {
        "collective_rpc": "supported; a callable runs as f(worker, *args) and must pickle for mp / ray",
        "generate": "supported, with token-id prompts and tokenization_kwargs; lora_request must be None (no LoRA), priority None or all zeros",
        "enqueue": "supported; lora_request must be None (no LoRA), priority None or all zeros",
        "chat": "supported, with tools and chat_template_content_format; lora_request must be None",
        "beam_search": "supported, with concurrency_limit; lora_request must be None",
    },
    "EngineArgs": {
        "swap_space": "accepted, ignored: preempted requests are recomputed, never swapped",
        "disable_log_stats": "accepted, ignored: LLM.get_metrics() always works",
        "enable_sleep_mode": "accepted: LLM.sleep() / wake_up() always work",
        "disable_custom_all_reduce": "accepted: kept in ParallelConfig for the custom all-reduce of the step loop",
        "max_seq_len_to_capture": "supported: decode steps with longer sequences run eagerly",
        "structured_outputs_config": "supported: backend 'auto' or 'xgrammar' (the one backend)",
        "tokenizer_mode": "supported: 'auto', 'slow'; 'mistral' refused with a ValueError",
        "cpu_offload_gb": "supported on CUDA (weights stream in per layer; no CUDA graphs); ValueError on CPU",
        "kv_cache_dtype": "supported: 'auto', 'fp8', 'fp8_e4m3' ('fp8_e5m2' refused with a ValueError)",
        "calculate_kv_scales": "False only: fp8 KV scales come from the checkpoint, else 1.0 (True: ValueError)",
    },
    "RequestOutput": {
        "lora_request": "always None: LoRA is not supported",
        "encoder_prompt": "always None: encoder-decoder models are not supported",
        "encoder_prompt_token_ids": "always None: encoder-decoder models are not supported",
        "kv_transfer_params": "always None: disaggregated prefill is not supported",
        "multi_modal_placeholders": "empty dict unless a multi-modal model fills it",
    },
    "CompletionOutput": {"lora_request": "always None: LoRA is not supported"},
}

REFUSED = {
    "SamplingParams": "refused: TypeError (unknown field)",
    "LLM": "refused: AttributeError (no such method)",
    "EngineArgs": "refused: TypeError (unknown engine option)",
    "RequestOutput": "absent",
    "CompletionOutput": "absent",
}

START_MARKER = "<!-- api-table:start (generated by python -m pagedllm.entrypoints.api_table --write) -->"
END_MARKER = "<!-- api-table:end -->"


def _present_names() -> dict[str, set[str]]:
    from pagedllm.engine.arg_utils import VLLM_DEFAULT_ONLY_OPTIONS, EngineArgs
    from pagedllm.engine.outputs import CompletionOutput, RequestOutput
    from pagedllm.engine.sampling_params import SamplingParams
    from pagedllm.entrypoints.llm import LLM

    init_fields = {f.name for f in dataclasses.fields(SamplingParams) if f.init}
    return {
        "SamplingParams": init_fields,
        "LLM": {name for name in dir(LLM) if not name.startswith("_") and callable(getattr(LLM, name))},
        "EngineArgs": {f.name for f in dataclasses.fields(EngineArgs)} | set(VLLM_DEFAULT_ONLY_OPTIONS),
        "RequestOutput": {f.name for f in dataclasses.fields(RequestOutput)},
        "CompletionOutput": {f.name for f in dataclasses.fields(CompletionOutput)},
    }


def _method_status(name: str) -> str | None:
    from pagedllm.entrypoints.llm import LLM

    doc = getattr(getattr(LLM, name, None), "__doc__", "") or ""
    return "refused: ValueError (pooling models are not supported)" if doc.startswith("Refused") else None


def _default_only_status(key: str, name: str) -> str | None:
    from pagedllm.engine.arg_utils import VLLM_DEFAULT_ONLY_OPTIONS

    if key != "EngineArgs" or name not in VLLM_DEFAULT_ONLY_OPTIONS:
        return None
    accepted, feature = VLLM_DEFAULT_ONLY_OPTIONS[name]
    return f"accepted as {' / '.join(map(repr, accepted))} only ({feature}); other values: ValueError"


def build_table() -> str:
    present = _present_names()
    sections = (
        ("SamplingParams", "SamplingParams fields", VLLM_SAMPLING_PARAMS),
        ("LLM", "LLM methods", VLLM_LLM_METHODS),
        ("EngineArgs", "Engine options (LLM keyword arguments)", VLLM_ENGINE_OPTIONS),
        ("RequestOutput", "RequestOutput fields", VLLM_REQUEST_OUTPUT_FIELDS),
        ("CompletionOutput", "CompletionOutput fields", VLLM_COMPLETION_OUTPUT_FIELDS),
    )
    lines = []
    for key, title, names in sections:
        counts = {"supported": 0, "other": 0}
        rows = []
        for name in names:
            if name not in present[key]:
                status = REFUSED[key]
            else:
                status = (_method_status(name) if key == "LLM" else None) or _default_only_status(key, name) \
                    or NOTES[key].get(name, "supported")
            counts["supported" if status.startswith("supported") else "other"] += 1
            rows.append(f"| `{name}` | {status} |")
        lines += [f"### {title} ({counts['supported']} of {len(names)} supported)", "", "| vLLM name | pagedllm |", "|---|---|", *rows, ""]
    return "\n".join(lines).rstrip() + "\n"


def replace_section(document: str, table: str) -> str:
    start = document.index(START_MARKER) + len(START_MARKER)
    end = document.index(END_MARKER)
    return document[:start] + "\n" + table + document[end:]


def committed_section(document: str) -> str:
    start = document.index(START_MARKER) + len(START_MARKER)
    return document[start : document.index(END_MARKER)].lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="MARKDOWN", help="update the table between the markers in this file")
    args = parser.parse_args(argv)
    table = build_table()
    if args.write is None:
        sys.stdout.write(table)
        return 0
    path = Path(args.write)
    path.write_text(replace_section(path.read_text(encoding="utf-8"), table), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
