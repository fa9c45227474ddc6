"""Tensor parallelism on two and four GPUs (NCCL): greedy tokens against transformers with CUDA
graphs captured around the all-reduces, workers started after the parent touched CUDA (at four
ranks the tiny models have fewer KV heads than ranks), the sharded state round trip, and Ray
actors. Each size is skipped with fewer GPUs visible; run with `pytest -m gpu tests/gpu`."""

from __future__ import annotations

import gc

import pytest
import torch
from tiny_models import FAMILIES, hf_greedy, make_tiny_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

PROMPTS = [[5, 17, 99, 23, 8], list(range(30, 100)), [(7 * i) % 380 + 3 for i in range(40)] + [11, 12], [300]]
MAX_TOKENS = 12
ENGINE = dict(skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.3)
TP_SIZES = [
    pytest.param(size, marks=pytest.mark.skipif(torch.cuda.device_count() < size, reason=f"needs {size} CUDA GPUs"))
    for size in (2, 4)
]
KV_HEADS = {"llama": 2, "qwen2": 2, "qwen3": 1}  # qwen3: one KV head replicated on both GPUs


def _tokens(llm) -> list[list[int]]:
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def _release(llm) -> None:
    llm.shutdown()
    del llm
    gc.collect()


@pytest.mark.parametrize("tp_size", TP_SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_gpus_give_transformers_greedy_tokens_even_after_the_parent_used_cuda(tmp_path, family, tp_size):
    from pagedllm import LLM

    # The engine's process has a CUDA context before the workers start: spawned workers
    # cannot hit "Cannot re-initialize CUDA in forked subprocess".
    torch.zeros(1, device="cuda")
    path = make_tiny_checkpoint(tmp_path / family, family, num_key_value_heads=KV_HEADS[family])
    expected = hf_greedy(path, PROMPTS, MAX_TOKENS)
    for enforce_eager in (True, False):
        llm = LLM(str(path), enforce_eager=enforce_eager, tensor_parallel_size=tp_size, **ENGINE)
        try:
            assert _tokens(llm) == expected, f"enforce_eager={enforce_eager}"
            assert len(set(llm.llm_engine.executor.collective_rpc("get_pid"))) == tp_size
        finally:
            _release(llm)


@pytest.mark.parametrize("tp_size", TP_SIZES)
def test_sharded_state_round_trip(tmp_path, tp_size):
    from pagedllm import LLM
    from pagedllm.entrypoints.save_sharded import save_sharded_checkpoint

    source = make_tiny_checkpoint(tmp_path / "model", "llama")
    save_sharded_checkpoint(str(source), str(tmp_path / "sharded"), tp_size, dtype="float32")
    llm = LLM(str(tmp_path / "sharded"), load_format="sharded_state", tensor_parallel_size=tp_size, **ENGINE)
    try:
        assert _tokens(llm) == hf_greedy(source, PROMPTS, MAX_TOKENS)
    finally:
        _release(llm)


def test_ray_actors_on_two_gpus(tmp_path):
    ray = pytest.importorskip("ray")
    from pagedllm import LLM

    path = make_tiny_checkpoint(tmp_path / "model", "llama")
    ray.init(num_gpus=2, include_dashboard=False)
    try:
        llm = LLM(str(path), distributed_executor_backend="ray", tensor_parallel_size=2, **ENGINE)
        try:
            assert _tokens(llm) == hf_greedy(path, PROMPTS, MAX_TOKENS)
        finally:
            _release(llm)
    finally:
        ray.shutdown()


_FORK_SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from pagedllm import LLM, SamplingParams

llm = LLM(sys.argv[1], tensor_parallel_size=2, skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.3)
prompts = json.loads(sys.argv[2])
params = SamplingParams(temperature=0.0, max_tokens=int(sys.argv[3]), ignore_eos=True)
outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
print("TOKENS " + json.dumps([o.outputs[0].token_ids for o in outputs]), flush=True)
llm.shutdown()
"""


def test_a_process_that_has_not_touched_cuda_forks_its_ranks(tmp_path):
    # pytest's process has used CUDA (the module's checks, other tests), so the engine runs in
    # a fresh one, as a user's script would.
    import json
    import subprocess
    import sys

    path = make_tiny_checkpoint(tmp_path / "model", "llama")
    script = tmp_path / "engine.py"
    script.write_text(_FORK_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(path), json.dumps(PROMPTS), str(MAX_TOKENS)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Started 2 worker processes (fork" in result.stderr, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("TOKENS "))
    assert json.loads(line[len("TOKENS "):]) == hf_greedy(path, PROMPTS, MAX_TOKENS)
