"""Where a decode step's time goes: torch.profiler over a few batch-1 decode steps of a dummy
model (Llama-3.1-8B's architecture by default), kernels and host functions by time.

    PYTHONPATH=. python3 benchmarks/profile_decode.py [--model qwen3] [--batch 1] [--quantization fp8]
    PYTHONPATH=. python3 benchmarks/profile_decode.py --tensor-parallel-size 2

With --tensor-parallel-size > 1 (or --trace-summary) the ranks profile themselves
(LLM.start_profile) and rank 0's trace is summarised: GPU time per step by kind of kernel,
kernels per step, and the time the GPU sits between kernels.
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import gzip
import json
import os
import pstats
import tempfile
import time
from collections import defaultdict

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
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--disable-custom-all-reduce", action="store_true", help="NCCL for every all-reduce")
    parser.add_argument("--trace-summary", action="store_true",
                        help="summarise rank 0's own trace (always so with --tensor-parallel-size > 1)")
    parser.add_argument("--unfused-activation-quant", action="store_true",
                        help="diagnostic: fp8 layers quantize their own inputs (no norm / SiLU output quantization)")
    args = parser.parse_args()
    from pagedllm import LLM, SamplingParams

    if args.unfused_activation_quant:
        from pagedllm.model_loader import loaders

        loaders.link_activation_quantization = lambda model: 0

    config = LLAMA_3_1_8B if args.model == "llama8b" else QWEN3_0_6B
    trace_dir = tempfile.mkdtemp(prefix="pagedllm-trace-")
    os.environ["PAGEDLLM_TORCH_PROFILER_DIR"] = trace_dir
    llm = LLM(write_config_dir(config), load_format="dummy", dtype="bfloat16", max_model_len=args.prompt_len + args.steps + 8,
              max_num_seqs=max(8, args.batch), skip_tokenizer_init=True, quantization=args.quantization,
              tensor_parallel_size=args.tensor_parallel_size, disable_custom_all_reduce=args.disable_custom_all_reduce)
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
    if args.tensor_parallel_size > 1 or args.trace_summary:
        llm.start_profile()
        for _ in range(8):
            engine.step()
        llm.stop_profile()
        summarize_rank_trace(trace_dir, steps=8)
        return
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


def _kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, keys in (("all-reduce + add + RMSNorm", ("all_reduce_add_rms_norm",)),
                       ("all-gather", ("allgather", "all_gather")),
                       ("all-reduce", ("all_reduce", "allreduce", "nccl", "one_shot", "two_shot")),
                       ("GEMV", ("gemv",)), ("matmul (cuBLAS)", ("gemm", "cutlass", "sm90_xmma", "nvjet")),
                       ("attention", ("decode", "attention")), ("norm", ("rms_norm",)),
                       ("rotary", ("rotary",)), ("SiLU-and-mul", ("silu",)), ("argmax / sampling", ("argmax",))):
        if any(key in lowered for key in keys):
            return kind
    return "other"


def summarize_rank_trace(trace_dir: str, steps: int) -> None:
    """GPU time per step of rank 0's trace, by kind of kernel, and the idle time between
    kernels (the span from the first kernel to the last, minus their busy time)."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "rank0*.json*")))
    if not paths:
        print(f"no rank-0 trace in {trace_dir}: {os.listdir(trace_dir)}")
        return
    opener = gzip.open if paths[0].endswith(".gz") else open
    with opener(paths[0], "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    if not kernels:
        print("the trace holds no kernels")
        return
    busy: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    covered, last_end = 0.0, kernels[0]["ts"]
    for event in kernels:
        kind = _kernel_kind(event["name"])
        busy[kind] += event["dur"]
        counts[kind] += 1
        start, end = event["ts"], event["ts"] + event["dur"]
        covered += max(0.0, end - max(start, last_end))
        last_end = max(last_end, end)
    span = last_end - kernels[0]["ts"]
    print(f"rank 0, {steps} decode steps: {len(kernels) / steps:.0f} kernels per step, "
          f"span {span / steps:.1f} us per step, GPU busy {covered / steps:.1f} us, idle between kernels "
          f"{(span - covered) / steps:.1f} us")
    for kind in sorted(busy, key=lambda k: -busy[k]):
        durations = sorted(e["dur"] for e in kernels if _kernel_kind(e["name"]) == kind)
        print(f"  {kind:<20}{busy[kind] / steps:9.1f} us per step  {counts[kind] / steps:6.0f} kernels  "
              f"(each: min {durations[0]:.1f}, median {durations[len(durations) // 2]:.1f}, max {durations[-1]:.1f} us)")
    names: dict[str, float] = defaultdict(float)
    for event in kernels:
        names[event["name"][:90]] += event["dur"]
    for name, total in sorted(names.items(), key=lambda item: -item[1])[:12]:
        print(f"    {total / steps:8.1f} us  {name}")


if __name__ == "__main__":
    main()
