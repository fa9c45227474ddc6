"""On a GPU: `pagedllm plan` within 5% of what the engine then allocates (weights, KV tokens)
for Qwen3-0.6B and Llama-3.1-8B shapes (dummy weights), and gpu_memory_utilization as each
engine's own budget (two engines of 0.4 side by side; a third fails at once).
Run with `PYTHONPATH=. pytest -m gpu tests/gpu/test_memory_plan_gpu.py`."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CONFIGS = {
    "Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 40960, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    },
    "Llama-3.1-8B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "rope_theta": 500000.0, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
}


def _write_config(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIGS[name]))
    return folder


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plan_is_within_5_percent_of_the_engine(tmp_path, name):
    from pagedllm import LLM
    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.worker.memory_plan import plan_memory

    folder = _write_config(tmp_path / name, name)
    kwargs = dict(skip_tokenizer_init=True, load_format="dummy", gpu_memory_utilization=0.6)
    total = torch.cuda.mem_get_info()[1]
    plan = plan_memory(EngineArgs.from_kwargs(str(folder), **kwargs).create_planning_config("cuda"), total)
    llm = LLM(str(folder), **kwargs)
    try:
        core = llm.llm_engine.engine_core
        weights = core.executor.collective_rpc("model_weight_bytes")[0]
        tokens = core.num_kv_blocks * core.config.cache_config.block_size
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    print(f"{name}: plan weights {plan.weights_bytes}, engine {weights}; plan KV tokens "
          f"{plan.kv.num_tokens}, engine {tokens}")
    assert abs(plan.weights_bytes - weights) <= 0.05 * weights
    assert abs(plan.kv.num_tokens - tokens) <= 0.05 * tokens


_ENGINE_SCRIPT = """
import sys
from pagedllm import LLM, SamplingParams
llm = LLM(sys.argv[1], skip_tokenizer_init=True, load_format="dummy", max_model_len=4096,
          gpu_memory_utilization=0.4)
llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4), use_tqdm=False)
print("READY", flush=True)
sys.stdin.readline()
llm.shutdown()
"""


def _start_engine(folder: Path, log: Path) -> subprocess.Popen[str]:
    # stderr to a file: an undrained pipe would block a chatty engine.
    with open(log, "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", _ENGINE_SCRIPT, str(folder)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )


def _wait_ready(process: subprocess.Popen[str], log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.strip() == "READY":
            return
        if not line and process.poll() is not None:
            raise AssertionError(f"engine exited with {process.returncode}: {log.read_text()[-3000:]}")
    raise AssertionError("engine did not start in time")


def test_two_engines_with_0_4_share_a_gpu_and_a_third_fails_at_once(tmp_path):
    folder = _write_config(tmp_path / "qwen3", "Qwen3-0.6B")
    logs = [tmp_path / f"engine{i}.log" for i in range(3)]
    engines = [_start_engine(folder, logs[0])]
    try:
        _wait_ready(engines[0], logs[0])
        engines.append(_start_engine(folder, logs[1]))
        _wait_ready(engines[1], logs[1])
        start = time.monotonic()
        third = _start_engine(folder, logs[2])
        engines.append(third)
        third.wait(timeout=300)
        stderr = logs[2].read_text()
        assert third.returncode != 0
        assert "gpu_memory_utilization=0.4 asks for" in stderr and "is free" in stderr, stderr[-3000:]
        assert time.monotonic() - start < 120  # before loading anything
    finally:
        for process in engines:
            if process.poll() is None:
                process.stdin.write("\n")  # type: ignore[union-attr]
                process.stdin.flush()  # type: ignore[union-attr]
        for process in engines:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
