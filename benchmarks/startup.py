"""Start-up: time from LLM(...) to ready on a real-size safetensors checkpoint written to
local disk first (Qwen3-0.6B's architecture), split into loading, profiling, KV allocation
and CUDA graph capture; loading GB/s.

    PYTHONPATH=. python3 benchmarks/startup.py
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from benchmarks.common import print_table
from benchmarks.throughput import write_hf_checkpoint


def main() -> None:
    from pagedllm import LLM

    folder = tempfile.mkdtemp(prefix="pagedllm-startup-")
    write_hf_checkpoint(folder)
    torch.cuda.empty_cache()
    checkpoint_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    rows = []
    for enforce_eager in (False, True):
        start = time.perf_counter()
        llm = LLM(folder, dtype="bfloat16", max_model_len=4096, enforce_eager=enforce_eager, skip_tokenizer_init=True)
        total = time.perf_counter() - start
        phases = llm.llm_engine.executor.startup_seconds
        label = "eager" if enforce_eager else "graphs"
        rows.append((f"{label}: LLM(...) to ready", f"{total:.1f} s"))
        rows += [(f"{label}:   {name}", f"{seconds:.2f} s") for name, seconds in phases.items()]
        rows.append((f"{label}:   other (config, tokenizer)", f"{total - sum(phases.values()):.2f} s"))
        rows.append((f"{label}:   loading rate", f"{checkpoint_bytes / phases['load'] / 1e9:.2f} GB/s"))
        llm.shutdown()
        del llm
        torch.cuda.empty_cache()
    print_table(f"startup, Qwen3-0.6B arch ({checkpoint_bytes / 1e9:.2f} GB safetensors), {torch.cuda.get_device_name()}", rows)


if __name__ == "__main__":
    main()
