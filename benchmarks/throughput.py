"""Throughput: 256 requests with prompt and output lengths uniform in 100-1024 (random token
ids, ignore_eos) on Qwen3-0.6B's architecture, against HF transformers `generate` on the same
weights in the same run, and against the hardware limit.

    PYTHONPATH=. python3 benchmarks/throughput.py [--num-requests 256] [--hf-requests 32] [--tensor-parallel-size 1]

The transformers baseline runs static batches of 32, left-padded (useful output tokens only);
by default only the first batch, since the whole workload takes it minutes: its tokens/s is
a rate, comparable with ours.

Time per step is split into GPU time (CUDA events around each step's work on the device, one
rank) and wall time; wall - GPU is host time the GPU waited for (scheduling, input building,
output processing not hidden by async scheduling). With N ranks the limit is N times one GPU's.
"""

from __future__ import annotations

import argparse
import gc
import tempfile

import numpy as np
import torch
import transformers

from benchmarks.common import QWEN3_0_6B, kv_bytes_per_token, measure_copy_bandwidth, print_table, timed, weight_bytes


def make_requests(num_requests: int, vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(100, 1025, num_requests)
    output_lens = rng.integers(100, 1025, num_requests)
    return [(rng.integers(0, vocab_size, int(p)).tolist(), int(o)) for p, o in zip(prompt_lens, output_lens)]


def write_hf_checkpoint(folder: str) -> None:
    config = transformers.Qwen3Config(**{k: v for k, v in QWEN3_0_6B.items() if k != "torch_dtype"})
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model


def hf_tokens_per_second(folder: str, requests: list[tuple[list[int], int]], batch_size: int) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda").eval()
    model.generation_config.eos_token_id = None
    useful_tokens, elapsed = 0, 0.0
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (prompt, _) in enumerate(batch):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        max_new = max(o for _, o in batch)
        with torch.no_grad():
            _, seconds = timed(lambda: model.generate(
                input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=max_new,
                min_new_tokens=max_new, do_sample=False, pad_token_id=0,
            ))
        useful_tokens += sum(o for _, o in batch)
        elapsed += seconds
    return useful_tokens / elapsed


def record_step_events(llm) -> list[tuple[torch.cuda.Event, torch.cuda.Event]] | None:
    """Wraps the in-process model runner's execute_model with CUDA events (one rank: the
    uni executor only); None with several ranks, whose runners live in other processes."""
    worker = getattr(llm.llm_engine.executor, "worker", None)
    if worker is None:
        return None
    runner = worker.model_runner
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    execute_model = runner.execute_model

    def timed_execute_model(scheduler_output):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        output = execute_model(scheduler_output)
        end.record()
        if not scheduler_output.is_empty:
            events.append((start, end))
        return output

    runner.execute_model = timed_execute_model
    return events


def step_split_rows(events, seconds: float) -> list[tuple[str, str]]:
    if not events:
        return [("time per step", "GPU/host split needs tensor_parallel_size=1")]
    torch.cuda.synchronize()
    gpu_seconds = sum(start.elapsed_time(end) for start, end in events) / 1e3
    steps = len(events)
    wall_ms, gpu_ms = seconds / steps * 1e3, gpu_seconds / steps * 1e3
    return [
        ("steps", f"{steps:,}"),
        ("wall time per step", f"{wall_ms:.2f} ms"),
        ("GPU time per step", f"{gpu_ms:.2f} ms ({gpu_ms / wall_ms:.1%} of wall)"),
        ("host time the GPU waited per step", f"{max(0.0, wall_ms - gpu_ms):.2f} ms"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--hf-requests", type=int, default=32, help="0 skips the baseline")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-async-scheduling runs the synchronous loop")
    args = parser.parse_args()
    tp = args.tensor_parallel_size

    from pagedllm import LLM, SamplingParams

    bandwidth = measure_copy_bandwidth()
    requests = make_requests(args.num_requests, QWEN3_0_6B["vocab_size"], args.seed)
    folder = tempfile.mkdtemp(prefix="pagedllm-throughput-")
    write_hf_checkpoint(folder)
    hf_rate = hf_tokens_per_second(folder, requests[: args.hf_requests], 32) if args.hf_requests else float("nan")
    gc.collect()
    torch.cuda.empty_cache()

    llm = LLM(folder, dtype="bfloat16", max_model_len=2048, max_num_seqs=args.max_num_seqs, skip_tokenizer_init=True,
              enforce_eager=args.enforce_eager, tensor_parallel_size=tp, async_scheduling=args.async_scheduling)
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in requests]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
    step_events = record_step_events(llm)
    outputs, seconds = timed(lambda: llm.generate(prompts, params, use_tqdm=False))
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert output_tokens == sum(o for _, o in requests)
    rate = output_tokens / seconds

    # The bytes that must move: the weights once per decode step (every request in flight at
    # once, so as many steps as the longest output) plus each token's reads of its context's KV.
    kv_reads = sum(sum(len(p) + t for t in range(o)) for p, o in requests) * kv_bytes_per_token(QWEN3_0_6B)
    limit_seconds = (max(o for _, o in requests) * weight_bytes(QWEN3_0_6B) + kv_reads) / (tp * bandwidth)
    limit_rate = output_tokens / limit_seconds
    print_table(f"throughput, Qwen3-0.6B arch, {args.num_requests} requests, {torch.cuda.get_device_name()}", [
        ("measured copy bandwidth", f"{bandwidth / 1e12:.2f} TB/s"),
        ("pagedllm output tokens/s", f"{rate:,.0f} ({output_tokens:,} tokens in {seconds:.1f} s)"),
        (f"transformers output tokens/s ({args.hf_requests} requests)", f"{hf_rate:,.0f}"),
        ("speed-up over transformers", f"{rate / hf_rate:.1f}x"),
        ("hardware limit tokens/s", f"{limit_rate:,.0f}"),
        ("fraction of hardware limit", f"{rate / limit_rate:.1%}"),
        *step_split_rows(step_events, seconds),
    ])


if __name__ == "__main__":
    main()
