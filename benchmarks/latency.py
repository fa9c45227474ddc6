"""Latency: batch 1, Llama-3.1-8B's architecture with dummy weights, 128 prompt tokens and 256
output tokens, with CUDA graphs and with enforce_eager=True, against the bandwidth limit.

    PYTHONPATH=. python3 benchmarks/latency.py [--input-len 128] [--output-len 256]
"""

from __future__ import annotations

import argparse
import gc

import numpy as np
import torch

from benchmarks.common import LLAMA_3_1_8B, kv_bytes_per_token, measure_copy_bandwidth, print_table, timed, weight_bytes, write_config_dir


def decode_tokens_per_second(folder: str, prompt: list[int], output_len: int, enforce_eager: bool) -> tuple[float, float]:
    from pagedllm import LLM, SamplingParams

    llm = LLM(folder, load_format="dummy", dtype="bfloat16", max_model_len=1024, max_num_seqs=8, skip_tokenizer_init=True,
              enforce_eager=enforce_eager)
    request = {"prompt_token_ids": prompt}
    llm.generate(request, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    _, full = timed(lambda: llm.generate(request, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True), use_tqdm=False))
    _, first = timed(lambda: llm.generate(request, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False))
    llm.shutdown()
    # Decode rate without the prefill: (output_len - 1) tokens in (full - first) seconds.
    return (output_len - 1) / (full - first), output_len / full


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    args = parser.parse_args()
    bandwidth = measure_copy_bandwidth()
    folder = write_config_dir(LLAMA_3_1_8B)
    prompt = np.random.default_rng(0).integers(0, LLAMA_3_1_8B["vocab_size"], args.input_len).tolist()
    graphs_decode, graphs_e2e = decode_tokens_per_second(folder, prompt, args.output_len, enforce_eager=False)
    gc.collect()
    torch.cuda.empty_cache()
    eager_decode, eager_e2e = decode_tokens_per_second(folder, prompt, args.output_len, enforce_eager=True)
    mean_context = args.input_len + args.output_len / 2
    step_bytes = weight_bytes(LLAMA_3_1_8B) + mean_context * kv_bytes_per_token(LLAMA_3_1_8B)
    limit = bandwidth / step_bytes
    print_table(f"latency, Llama-3.1-8B arch, batch 1, {args.input_len} in / {args.output_len} out, {torch.cuda.get_device_name()}", [
        ("measured copy bandwidth", f"{bandwidth / 1e12:.2f} TB/s"),
        ("bytes per decode step", f"{step_bytes / 1e9:.2f} GB"),
        ("bandwidth limit tokens/s", f"{limit:.1f}"),
        ("CUDA graphs: decode tokens/s", f"{graphs_decode:.1f} ({graphs_decode / limit:.1%} of limit; end to end {graphs_e2e:.1f})"),
        ("eager: decode tokens/s", f"{eager_decode:.1f} ({eager_decode / limit:.1%} of limit; end to end {eager_e2e:.1f})"),
    ])


if __name__ == "__main__":
    main()
