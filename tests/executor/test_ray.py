"""The Ray executor on a local Ray instance: two CPU actors placed by a placement group give
transformers' greedy tokens, a killed actor is a clear error, and shutdown removes the
actors."""

from __future__ import annotations

import os
import signal
import time

import pytest
from tiny_models import hf_greedy

from pagedllm import LLM, SamplingParams
from pagedllm.executor.base import WorkerDiedError

ray = pytest.importorskip("ray")

PROMPTS = [[5, 17, 99, 23, 8], list(range(30, 100))]
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.timeout(180)
def test_ray_actors_give_transformers_greedy_tokens_and_report_a_dead_actor(local_ray, tiny_checkpoints):
    path = tiny_checkpoints["llama"]
    expected = hf_greedy(path, PROMPTS, MAX_TOKENS)
    llm = LLM(
        str(path), tensor_parallel_size=2, distributed_executor_backend="ray",
        skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 24,
    )
    executor = llm.llm_engine.executor
    assert type(executor).__name__ == "RayExecutor"
    pids = executor.worker_pids
    assert sorted(executor.collective_rpc("get_pid")) == sorted(pids) and os.getpid() not in pids
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected

    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match="Worker rank 1 .*died"):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 60
    llm.shutdown()
    # The placement group's bundles are free again for the next engine.
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 2
