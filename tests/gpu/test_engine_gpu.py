"""The engine on a GPU: tokens against transformers, CUDA graphs against eager, and the memory
budget of gpu_memory_utilization. Run with `pytest -m gpu tests/gpu` on a GPU machine."""

from __future__ import annotations

import gc

import pytest
import torch
from tiny_models import FAMILIES, hf_greedy, make_tiny_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = [[5, 17, 99, 23, 8], list(range(30, 100)), [(7 * i) % 380 + 3 for i in range(40)] + [11, 12], [300]]
MAX_TOKENS = 12


def _release(llm) -> None:
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def _tokens(llm, prompts, max_tokens=MAX_TOKENS):
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_greedy_tokens_equal_transformers(tmp_path, family):
    from pagedllm import LLM

    path = make_tiny_checkpoint(tmp_path / family, family)
    expected = hf_greedy(path, PROMPTS, MAX_TOKENS)
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.3,
              max_num_batched_tokens=32)  # chunked prefill and mixed steps
    try:
        assert _tokens(llm, PROMPTS) == expected
        assert _tokens(llm, PROMPTS) == expected  # now with prefix-cache hits
    finally:
        _release(llm)


def test_cuda_graphs_give_eager_tokens_and_a_smaller_list_saves_memory(qwen3_0_6b_folder):
    from pagedllm import LLM

    prompts = [[i + 1 for i in range(20 + 7 * r)] for r in range(24)]
    common = dict(skip_tokenizer_init=True, load_format="dummy", max_model_len=1024, gpu_memory_utilization=0.5)

    eager = LLM(str(qwen3_0_6b_folder), enforce_eager=True, **common)
    eager_tokens = _tokens(eager, prompts, 16)
    _release(eager)

    graph_memory = {}
    for label, compilation_config in (("full", None), ("small", {"cudagraph_capture_sizes": [1, 2, 4]})):
        llm = LLM(str(qwen3_0_6b_folder), compilation_config=compilation_config, **common)
        graph_memory[label] = llm.llm_engine.executor.collective_rpc("graph_memory_bytes")[0]
        assert _tokens(llm, prompts, 16) == eager_tokens
        _release(llm)
    assert graph_memory["small"] < graph_memory["full"]


def test_process_stays_within_gpu_memory_utilization_and_kv_takes_the_rest(qwen3_0_6b_folder):
    from pagedllm import LLM

    utilization = 0.4
    llm = LLM(str(qwen3_0_6b_folder), skip_tokenizer_init=True, load_format="dummy", max_model_len=4096,
              gpu_memory_utilization=utilization)
    try:
        _tokens(llm, PROMPTS, 4)
        free, total = torch.cuda.mem_get_info()
        used = total - free
        assert used <= (utilization + 0.01) * total, (used / total)
        kv_bytes = llm.llm_engine.executor.collective_rpc("kv_cache_bytes")[0]
        left_over = utilization * total - used
        assert kv_bytes >= 0.95 * (kv_bytes + max(left_over, 0)), (kv_bytes, left_over)
    finally:
        _release(llm)
