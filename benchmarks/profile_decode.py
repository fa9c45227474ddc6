"""Where a decode step's time goes: torch.profiler over a few batch-1 decode steps of a dummy
model (Llama-3.1-8B's architecture by default), kernels and host functions by time.

    PYTHONPATH=. python3 benchmarks/profile_decode.py [--model qwen3] [--batch 1] [--quantization fp8]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import LLAMA_3_1_8B, QWEN3_0_6B, write_config_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("llama8b", "qwen3"), default="llama8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--quantization", default=None, help='e.g. "fp8" (dynamic fp8)')
    parser.add_argument("--unfused-activation-quant", action="store_true",
                        help="diagnostic: fp8 layers quantize their own inputs (no norm / SiLU output quantization)")
    args = parser.parse_args()
    from pagedllm import LLM, SamplingParams

    if args.unfused_activation_quant:
        from pagedllm.model_loader import loaders

        loaders.link_activation_quantization = lambda model: 0

    config = LLAMA_3_1_8B if args.model == "llama8b" else QWEN3_0_6B
    llm = LLM(write_config_dir(config), load_format="dummy", dtype="bfloat16", max_model_len=args.prompt_len + args.steps + 8,
              max_num_seqs=max(8, args.batch), skip_tokenizer_init=True, quantization=args.quantization)
    prompts = [{"prompt_token_ids": [1 + (i + r) % 1000 for i in range(args.prompt_len)]} for r in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.steps, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    # Prefill first, so the profiled steps are decode steps only.
    engine = llm.llm_engine
    for index, prompt in enumerate(prompts):
        engine.add_request(f"p{index}", prompt, params)
    while any(not r.num_output_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(8):
        engine.step()
    torch.cuda.synchronize()
    print(f"decode step wall time: {(time.perf_counter() - start) / 8 * 1e3:.2f} ms at batch {args.batch}")
    cpu_profile = cProfile.Profile()
    cpu_profile.enable()
    for _ in range(8):
        engine.step()
    cpu_profile.disable()
    pstats.Stats(cpu_profile).sort_stats("cumulative").print_stats(25)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            engine.step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
