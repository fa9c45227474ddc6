"""Quantized decode speed against bf16 in the same run, each against its own bandwidth limit.

    PYTHONPATH=. python3 benchmarks/quantization.py --scheme fp8 --workload latency
    PYTHONPATH=. python3 benchmarks/quantization.py --scheme int8 --workload throughput

Schemes (load_format="dummy": random weights of the scheme's own layout, positive scales):
  bf16       no quantization
  fp8        quantization="fp8" (float8_e4m3fn weights, per-channel scales, torch._scaled_mm)
  int8       compressed-tensors W8A8 int8 (per-channel weights, per-token activations, torch._int_mm)
  gptq-int4  GPTQ 4-bit, group 128, symmetric
  awq-int4   AWQ 4-bit GEMM, group 128, zero points
Workloads:
  latency     Llama-3.1-8B architecture, batch 1, 128 prompt tokens, 256 output tokens
  throughput  Qwen3-0.6B architecture, 256 requests of 100..1024 prompt and output tokens
The limit is the bytes a step must read (quantized linear weights with their scales and zero
points, the bf16 LM head, the KV cache) over the measured device copy bandwidth. Targets at
batch 1: fp8 >= 1.6x bf16, int4 >= 2.5x, each >= 80% of its own limit.
"""

from __future__ import annotations

import argparse
import gc
import os

import numpy as np
import torch

from benchmarks.common import (
    LLAMA_3_1_8B,
    QWEN3_0_6B,
    batch1_decode_rates,
    kv_bytes_per_token,
    measure_copy_bandwidth,
    print_table,
    timed,
    weight_bytes,
    write_config_dir,
)
from benchmarks.throughput import make_requests

_GROUP = 128
# quantization_config written into config.json for checkpoint schemes (None: option or none).
_CHECKPOINT_CONFIGS: dict[str, dict | None] = {
    "bf16": None,
    "fp8": None,
    "int8": {
        "quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True},
        }},
    },
    "gptq-int4": {"quant_method": "gptq", "bits": 4, "group_size": _GROUP, "sym": True, "desc_act": False},
    "awq-int4": {"quant_method": "awq", "bits": 4, "group_size": _GROUP, "zero_point": True, "version": "gemm"},
}
TARGET_SPEEDUP = {"fp8": 1.6, "int8": 1.6, "gptq-int4": 2.5, "awq-int4": 2.5}


def linear_weight_bytes(config: dict, scheme: str) -> float:
    """Bytes of the decoder's linear layers per step under `scheme` (weights + scales + zeros)."""
    all_matrices = weight_bytes(config, dtype_bytes=1)  # parameters, LM head included
    linear = all_matrices - config["vocab_size"] * config["hidden_size"]
    if scheme == "bf16":
        return 2 * linear
    if scheme in ("fp8", "int8"):
        return linear  # one byte per weight; per-channel scales are negligible
    # 4 bits per weight, a 2-byte scale and a 4-bit zero point per group of 128.
    return linear * (0.5 + (2 + 0.5) / _GROUP)


def step_bytes(config: dict, scheme: str, kv_tokens: float) -> float:
    lm_head = config["vocab_size"] * config["hidden_size"] * 2
    return linear_weight_bytes(config, scheme) + lm_head + kv_tokens * kv_bytes_per_token(config)


def make_llm(config: dict, scheme: str, **kwargs):
    from pagedllm import LLM

    quant_config = _CHECKPOINT_CONFIGS[scheme]
    folder = write_config_dir(config if quant_config is None else {**config, "quantization_config": quant_config})
    options = {"quantization": "fp8"} if scheme == "fp8" else {}
    return LLM(folder, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, **options, **kwargs)


def latency(scheme: str, input_len: int = 128, output_len: int = 256) -> float:
    """Batch-1 decode tokens/s (prefill excluded) with CUDA graphs."""
    llm = make_llm(LLAMA_3_1_8B, scheme, max_model_len=1024, max_num_seqs=8)
    prompt = np.random.default_rng(0).integers(0, LLAMA_3_1_8B["vocab_size"], input_len).tolist()
    try:
        return batch1_decode_rates(llm, prompt, output_len)[0]
    finally:
        llm.shutdown()


def latency_limit(scheme: str, bandwidth: float, input_len: int = 128, output_len: int = 256) -> float:
    return bandwidth / step_bytes(LLAMA_3_1_8B, scheme, input_len + output_len / 2)


def throughput(scheme: str, requests: list[tuple[list[int], int]]) -> float:
    from pagedllm import SamplingParams

    llm = make_llm(QWEN3_0_6B, scheme, max_model_len=2048, max_num_seqs=256)
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in requests]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)
    outputs, seconds = timed(lambda: llm.generate(prompts, params, use_tqdm=False))
    llm.shutdown()
    return sum(len(o.outputs[0].token_ids) for o in outputs) / seconds


def throughput_limit(scheme: str, bandwidth: float, requests: list[tuple[list[int], int]]) -> float:
    """Output tokens/s if every step only read the weights once (as many steps as the longest
    output) and each token its context's KV."""
    kv_tokens = sum(sum(len(p) + t for t in range(o)) for p, o in requests)
    weights = max(o for _, o in requests) * step_bytes(QWEN3_0_6B, scheme, 0)
    seconds = (weights + kv_tokens * kv_bytes_per_token(QWEN3_0_6B)) / bandwidth
    return sum(o for _, o in requests) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scheme", choices=list(_CHECKPOINT_CONFIGS), default="fp8")
    parser.add_argument("--workload", choices=["latency", "throughput"], default="latency")
    parser.add_argument("--num-requests", type=int, default=256)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bandwidth = measure_copy_bandwidth()
    schemes = ["bf16"] if args.scheme == "bf16" else [args.scheme, "bf16"]
    rates, limits = {}, {}
    requests = make_requests(args.num_requests, QWEN3_0_6B["vocab_size"], 0)
    for scheme in schemes:
        if args.workload == "latency":
            rates[scheme], limits[scheme] = latency(scheme), latency_limit(scheme, bandwidth)
        else:
            rates[scheme], limits[scheme] = throughput(scheme, requests), throughput_limit(scheme, bandwidth, requests)
        gc.collect()
        torch.cuda.empty_cache()
    arch = "Llama-3.1-8B arch, batch 1" if args.workload == "latency" else f"Qwen3-0.6B arch, {args.num_requests} requests"
    rows = [("measured copy bandwidth", f"{bandwidth / 1e12:.2f} TB/s")]
    for scheme in schemes:
        rows.append((f"{scheme} tokens/s", f"{rates[scheme]:,.1f} ({rates[scheme] / limits[scheme]:.1%} of its limit {limits[scheme]:,.1f})"))
    if args.scheme != "bf16":
        speedup = rates[args.scheme] / rates["bf16"]
        target = TARGET_SPEEDUP[args.scheme]
        rows.append((f"{args.scheme} / bf16", f"{speedup:.2f}x (target at batch 1: >= {target}x, >= 80% of limit)"))
    print_table(f"quantization {args.scheme}, {args.workload}, {arch}, {torch.cuda.get_device_name()}", rows)


if __name__ == "__main__":
    main()
