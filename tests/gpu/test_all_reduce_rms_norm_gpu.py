"""The fused all-reduce + residual add + RMSNorm on two GPUs: the kernel against the unfused
chain in torch on data all-gathered through NCCL (eagerly, and replayed from a CUDA graph so
the device-side epochs keep counting), and an engine in bf16 with CUDA graphs whose prompt
logprobs equal those of the same engine with the fusion off. Run with `pytest -m gpu tests/gpu`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from tiny_models import make_tiny_checkpoint

from pagedllm.executor.base import get_open_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

_KERNEL_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from pagedllm.distributed.parallel_state import get_custom_all_reduce, init_custom_all_reduce, init_distributed

rank, port = int(sys.argv[1]), sys.argv[2]
init_distributed(2, rank, "nccl", f"tcp://127.0.0.1:{port}", local_rank=rank)
device = torch.device("cuda", rank)
init_custom_all_reduce(device, disable=False)
fused = get_custom_all_reduce()
assert fused is not None and fused.fuses_norms
hidden, eps = 4096, 1e-5
torch.manual_seed(0)  # the weight and residual are the same on both ranks, the partial sums not
weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(torch.bfloat16)
own_partials = torch.Generator(device).manual_seed(100 + rank)


def reference(partial, residual):
    parts = [torch.empty_like(partial) for _ in range(2)]
    dist.all_gather(parts, partial)
    summed = (parts[0].float() + parts[1].float()).to(torch.bfloat16) + residual
    normed = summed.float() * torch.rsqrt(summed.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(torch.bfloat16), summed


def check(x, residual, expected):
    assert torch.equal(residual, expected[1])
    # The sum of squares (another order) and rsqrt (approximate) differ from torch's: the
    # normalised value may round one bf16 ulp apart, and its product with the weight one more.
    torch.testing.assert_close(x.float(), expected[0].float(), rtol=1.6e-2, atol=1e-5)


for rows in (1, 3, 8, fused.max_fused_rows, 1):
    for _ in range(3):
        partial = torch.randn(rows, hidden, device=device, generator=own_partials).to(torch.bfloat16)
        residual = torch.randn(rows, hidden, device=device).to(torch.bfloat16)
        expected = reference(partial, residual)
        x, new_residual = fused.all_reduce_add_rms_norm(partial.clone(), residual.clone(), weight, eps)
        check(x, new_residual, expected)

# Graph replays: three chained calls, as consecutive layers make them.
rows = 4
static_x = torch.zeros(3, rows, hidden, device=device, dtype=torch.bfloat16)
static_residual = torch.zeros(rows, hidden, device=device, dtype=torch.bfloat16)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    for layer in range(3):
        fused.all_reduce_add_rms_norm(static_x[layer], static_residual, weight, eps)
for _ in range(20):
    partials = torch.randn(3, rows, hidden, device=device, generator=own_partials).to(torch.bfloat16)
    residual = torch.randn(rows, hidden, device=device).to(torch.bfloat16)
    static_x.copy_(partials)
    static_residual.copy_(residual)
    graph.replay()
    for layer in range(3):
        expected = reference(partials[layer], residual)
        residual = expected[1]
    check(static_x[2], static_residual, expected)
torch.cuda.synchronize()
dist.destroy_process_group()
print("ok", flush=True)
"""


def test_fused_kernel_equals_the_unfused_chain_eager_and_in_graphs(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(_KERNEL_SCRIPT)
    port = str(get_open_port())
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), port], stdout=log.open("w"),
                              stderr=subprocess.STDOUT) for rank, log in enumerate(logs)]
    # A rank that fails leaves the other waiting for its packets: stop both at the first failure.
    deadline = time.monotonic() + 240
    while any(process.poll() is None for process in ranks) and time.monotonic() < deadline:
        if any(process.poll() not in (None, 0) for process in ranks):
            break
        time.sleep(0.5)
    for process in ranks:
        if process.poll() is None:
            process.kill()
            process.wait()
    for rank, (process, log) in enumerate(zip(ranks, logs)):
        output = log.read_text()
        assert process.returncode == 0 and output.strip().endswith("ok"), f"rank {rank}: {output[-3000:]}"


_ENGINE_SCRIPT = """
import json, sys
from pagedllm import LLM, SamplingParams
from pagedllm.distributed.parallel_state import get_custom_all_reduce


def fused_calls(worker):
    fused = get_custom_all_reduce()
    return 0 if fused is None else int(fused.row_epochs.sum())


llm = LLM(sys.argv[1], tensor_parallel_size=2, skip_tokenizer_init=True, dtype="bfloat16", gpu_memory_utilization=0.3)
prompts = json.loads(sys.argv[2])
params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0, prompt_logprobs=0)
outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
prompt_logprobs = [[next(iter(entry.values())).logprob for entry in o.prompt_logprobs[1:]] for o in outputs]
print("RESULT " + json.dumps({"prompt_logprobs": prompt_logprobs,
                              "fused_calls": llm.collective_rpc(fused_calls)}),
      flush=True)
llm.shutdown()
"""


def test_an_engine_with_the_fusion_gives_the_logprobs_of_one_without(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "model", "llama", hidden_size=256, intermediate_size=512)
    script = tmp_path / "engine.py"
    script.write_text(_ENGINE_SCRIPT)
    prompts = [[5, 17, 99, 23, 8], list(range(30, 100)), [300, 4, 4, 9]]
    results = {}
    for fuse in ("1", "0"):
        env = {**os.environ, "PAGEDLLM_FUSE_ALL_REDUCE_RMS_NORM": fuse}
        # A fresh process, so that the ranks fork from one that has not touched CUDA.
        result = subprocess.run([sys.executable, str(script), str(path), json.dumps(prompts)], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
        results[fuse] = json.loads(line[len("RESULT "):])
    # The decode steps (graphs, decode-sized rows) took the fused kernel on both ranks.
    assert all(calls > 0 for calls in results["1"]["fused_calls"]), results["1"]["fused_calls"]
    assert results["0"]["fused_calls"] == [0, 0]
    for fused, unfused in zip(results["1"]["prompt_logprobs"], results["0"]["prompt_logprobs"]):
        # bf16 on both sides, with the same sums in the same order: differences are within the
        # norm's own rounding (its sum of squares in another order).
        assert len(fused) == len(unfused)
        torch.testing.assert_close(torch.tensor(fused), torch.tensor(unfused), rtol=0, atol=2e-2)
