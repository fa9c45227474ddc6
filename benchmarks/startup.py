"""Start-up: time from LLM(...) to ready, split into loading, profiling, KV allocation and CUDA
graph capture, and the first generate's time (which should compile nothing).

    PYTHONPATH=. python3 benchmarks/startup.py [--model qwen3|llama] [--tensor-parallel-size 1] [--cold]

qwen3: Qwen3-0.6B's architecture, a real safetensors checkpoint written to local disk first
(loading GB/s); llama: Llama-3.1-8B's architecture with load_format="dummy". With --cold each
measurement runs in a fresh process: first with an empty TRITON_CACHE_DIR (a new machine),
then again with the cache it filled (warm), so the cold cost of compiling kernels is printed
next to its warm baseline (targets: cold ready <= 8 s for Qwen3-0.6B, <= 5 s for Llama-3.1-8B).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.common import LLAMA_3_1_8B, print_table, write_config_dir


def measure(folder: str, load_format: str, tp: int, enforce_eager: bool) -> dict:
    """One LLM start and first generate in this process."""
    from pagedllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(folder, dtype="bfloat16", max_model_len=4096, enforce_eager=enforce_eager, skip_tokenizer_init=True,
              load_format=load_format, tensor_parallel_size=tp)
    ready = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate({"prompt_token_ids": list(range(100, 228))}, SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
    first_generate = time.perf_counter() - start
    phases = dict(llm.llm_engine.executor.startup_seconds)
    llm.shutdown()
    return {"ready": ready, "first_generate": first_generate, "phases": phases}


def rows_for(label: str, result: dict, checkpoint_bytes: int) -> list[tuple[str, str]]:
    phases = result["phases"]
    rows = [(f"{label}: LLM(...) to ready", f"{result['ready']:.1f} s")]
    rows += [(f"{label}:   {name}", f"{seconds:.2f} s") for name, seconds in phases.items()]
    rows.append((f"{label}:   other (config, tokenizer, processes)", f"{result['ready'] - sum(phases.values()):.2f} s"))
    if checkpoint_bytes:
        rows.append((f"{label}:   loading rate", f"{checkpoint_bytes / phases['load'] / 1e9:.2f} GB/s"))
    rows.append((f"{label}: first generate (128 in / 16 out)", f"{result['first_generate']:.2f} s"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("qwen3", "llama"), default="qwen3")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--cold", action="store_true", help="fresh TRITON_CACHE_DIR, each run in its own process")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # folder,load_format,enforce_eager: one measurement
    args = parser.parse_args()
    tp = args.tensor_parallel_size
    if args.child:
        folder, load_format, eager = args.child.split(",")
        print("RESULT " + json.dumps(measure(folder, load_format, tp, eager == "1")), flush=True)
        return

    if args.model == "qwen3":
        from benchmarks.throughput import write_hf_checkpoint

        folder, load_format = tempfile.mkdtemp(prefix="pagedllm-startup-"), "auto"
        write_hf_checkpoint(folder)
        checkpoint_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    else:
        folder, load_format, checkpoint_bytes = write_config_dir(LLAMA_3_1_8B), "dummy", 0
    torch.cuda.empty_cache()
    rows = []
    if args.cold:
        cache_dir = tempfile.mkdtemp(prefix="pagedllm-triton-cache-")
        python_path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "TRITON_CACHE_DIR": cache_dir, "PYTHONPATH": python_path}
        for label in ("cold (empty Triton cache)", "warm (same cache)"):
            command = [sys.executable, "-m", "benchmarks.startup", "--tensor-parallel-size", str(tp),
                       "--child", f"{folder},{load_format},0"]
            child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            if child.returncode != 0:
                sys.exit(f"The {label} start failed (exit status {child.returncode}):\n{child.stderr[-4000:]}")
            output = child.stdout
            result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
            rows += rows_for(label, result, checkpoint_bytes)
    else:
        for enforce_eager in (False, True):
            rows += rows_for("eager" if enforce_eager else "graphs", measure(folder, load_format, tp, enforce_eager), checkpoint_bytes)
            torch.cuda.empty_cache()
    size = f"{checkpoint_bytes / 1e9:.2f} GB safetensors" if checkpoint_bytes else "dummy weights"
    print_table(f"startup, {args.model} arch ({size}), tensor_parallel_size={tp}, {torch.cuda.get_device_name()}", rows)


if __name__ == "__main__":
    main()
