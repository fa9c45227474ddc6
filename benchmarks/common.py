"""Shared pieces of the benchmarks: architecture configs, bandwidth measurement, tables."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

# Numbers from the models' public config.json (see ../shared/GPU_NOTES.md).
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
    "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 40960,
    "hidden_act": "silu", "attention_bias": False, "torch_dtype": "bfloat16",
    "bos_token_id": 151643, "eos_token_id": 151645,
}
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 131072,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
    "bos_token_id": 128000, "eos_token_id": 128001,
}


def write_config_dir(config: dict, root: str | None = None) -> str:
    """A folder with only config.json: enough for load_format="dummy"."""
    folder = tempfile.mkdtemp(prefix="pagedllm-bench-", dir=root)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


def weight_bytes(config: dict, dtype_bytes: int = 2) -> int:
    """Bytes of weights one decode step must read: every matrix; the embedding table is only
    gathered, unless it is tied and doubles as the LM head."""
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
    mlp = 3 * hidden * inter
    lm_head = config["vocab_size"] * hidden
    return (layers * (attention + mlp) + lm_head) * dtype_bytes


def kv_bytes_per_token(config: dict, dtype_bytes: int = 2) -> int:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * dtype_bytes


def measure_copy_bandwidth(num_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of repeats."""
    src = torch.empty(num_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    del src, dst
    torch.cuda.empty_cache()
    return num_bytes / times[len(times) // 2]


def measure_copy_bandwidth_in_child() -> float:
    """measure_copy_bandwidth in a fresh process, so that this one does not touch CUDA (an
    engine of several ranks forks them from it only while it has not)."""
    repository_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (repository_root, os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-c", "from benchmarks.common import measure_copy_bandwidth; print(measure_copy_bandwidth())"],
        env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, check=True,
    )
    return float(result.stdout.split()[-1])


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def batch1_decode_rates(llm, prompt: list[int], output_len: int) -> tuple[float, float]:
    """(decode tokens/s without the prefill, end-to-end tokens/s) of one greedy request:
    output_len - 1 tokens in the time a full generate takes beyond a one-token one. The
    one-token time is the fastest of three, before and after the full one, so that a stall in
    one of them cannot skew the difference (a first run once read a negative rate). Triton
    compiles after the warm-up generate are reported: the engine's start-up pass should leave
    none."""
    from pagedllm import SamplingParams

    request = {"prompt_token_ids": prompt}
    llm.generate(request, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    with late_compiles() as compiled:

        def generate(max_tokens: int) -> float:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            return timed(lambda: llm.generate(request, params, use_tqdm=False))[1]

        first = [generate(1)]
        full = generate(output_len)
        first += [generate(1), generate(1)]
    if compiled:
        print(f"warning: {len(compiled)} Triton kernels compiled after the warm-up: {sorted(set(compiled))}")
    return (output_len - 1) / (full - min(first)), output_len / full


@contextlib.contextmanager
def late_compiles() -> Iterator[list[str]]:
    """Inside, every Triton compile appends its kernel's name to the yielded list."""
    from triton import knobs

    compiled: list[str] = []
    previous = knobs.runtime.jit_post_compile_hook

    def record(*, fn, **_) -> None:
        compiled.append(fn.name)

    knobs.runtime.jit_post_compile_hook = record
    try:
        yield compiled
    finally:
        knobs.runtime.jit_post_compile_hook = previous


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n## {title}")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


def graph_seconds_per_call(fn: Callable[[int], object], calls_per_replay: int, replays: int = 30,
                           before_replay: Callable[[], object] | None = None) -> float:
    """Median seconds per call of fn(i), i = 0..calls_per_replay-1, from replays of one CUDA
    graph holding all the calls (so launch overhead is not timed). fn(i) may rotate through
    buffers by i so that successive calls do not hit a warm L2. before_replay runs (untimed,
    the GPU idle) before each timed replay: a barrier, so that ranks start together."""
    import statistics

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls_per_replay):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls_per_replay):
            fn(i)
    graph.replay()
    times = []
    for _ in range(replays):
        if before_replay is not None:
            before_replay()
            torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls_per_replay)
    return statistics.median(times)
