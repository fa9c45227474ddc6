"""Start-up compiles the engine's Triton kernels in one parallel pass before the profile
(worker/precompile.py): with an empty Triton cache, every kernel variant that start-up and a
first generate launch (greedy and random sampling, prefill, mixed and decode steps, with and
without CUDA graphs) was compiled in that pass, and none afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import hf_greedy, make_tiny_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() == 0, reason="needs a CUDA GPU"),
]

_SCRIPT = """
import json, sys
from triton import knobs

compiles = []

def record(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
    compiles.append([fn.name, bool(is_manual_warmup)])

knobs.runtime.jit_post_compile_hook = record
from pagedllm import LLM, SamplingParams

llm = LLM(sys.argv[1], skip_tokenizer_init=True, enforce_eager=sys.argv[2] == "eager", dtype=sys.argv[3],
          gpu_memory_utilization=0.3)
at_ready = len(compiles)
prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 40, 16, 300)]
greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, ignore_eos=True, seed=1)
tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
llm.generate(prompts, sampled, use_tqdm=False)
llm.generate(prompts[:1], greedy, use_tqdm=False)
print("RESULT " + json.dumps({"compiles": compiles, "at_ready": at_ready, "tokens": tokens}), flush=True)
llm.shutdown()
"""


@pytest.mark.parametrize("mode, dtype", [("graphs", "bfloat16"), ("eager", "float32")])
def test_every_kernel_compiles_in_the_start_up_pass(tmp_path, mode, dtype):
    path = make_tiny_checkpoint(tmp_path / "model", "llama")
    script = tmp_path / "engine.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    result = subprocess.run(
        [sys.executable, str(script), str(path), mode, dtype], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    report = json.loads(line[len("RESULT "):])
    assert report["compiles"], "nothing compiled: the Triton cache was not empty"
    late = [name for name, in_pass in report["compiles"] if not in_pass]
    assert late == [], f"compiled outside the start-up pass: {late}"
    assert len(report["compiles"]) == report["at_ready"], "the first generate compiled a kernel"
    if dtype == "float32":  # the kernels compiled in the pass compute what transformers does
        prompts = [list(range(3, 3 + n)) for n in (5, 40, 16, 300)]
        assert report["tokens"] == hf_greedy(path, prompts, 20)
