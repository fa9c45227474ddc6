"""Tensor parallelism end to end: LLM(tensor_parallel_size=2) over two spawned CPU processes
(gloo) gives transformers' greedy tokens, and the same tokens as one rank, for every family,
including key/value heads split across ranks, one key/value head replicated on both ranks
(fewer KV heads than ranks) and tied embeddings; each worker reads only its shards; a model
that cannot be split fails at start-up, before any process starts."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import transformers
from safetensors import safe_open
from tiny_models import FAMILIES, hf_greedy, make_tiny_checkpoint

from pagedllm import LLM, SamplingParams
from pagedllm.engine.arg_utils import EngineArgs

PROMPTS = [[5, 17, 99, 23, 8], list(range(30, 100)), [300, 301]]
MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
ENGINE = dict(skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 24)
# family -> checkpoint variant: KV heads split (2 over 2 ranks), tied embeddings, and one KV
# head replicated on both ranks (Qwen3's per-head q/k norms ride along).
VARIANTS = {
    "llama": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(num_key_value_heads=1),
}


def _tokens(llm: LLM, params: SamplingParams = GREEDY) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def _expected_bytes_per_rank(path, num_kv_heads: int, tp_size: int) -> int:
    """What one rank reads: its share of each matrix (a whole KV head when there are fewer KV
    heads than ranks), and every vector (norms, biases) whole."""
    total = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            size = tensor.numel() * tensor.element_size()
            if tensor.dim() < 2:
                total += size
            elif num_kv_heads < tp_size and name.endswith(("k_proj.weight", "v_proj.weight")):
                total += size // num_kv_heads  # one whole KV head per rank
            else:
                total += size // tp_size
    return total


def _check_sampled_logprobs_match_transformers(llm: LLM, path) -> None:
    """Every rank samples from the same all-gathered logits and appends the token it drew to
    its own copy of the request; if the ranks drew different tokens, their copies would
    diverge and the all-reduced activations would turn to garbage. So the logprob of every
    sampled token must equal transformers' on the sampled sequence (1e-4)."""
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, logprobs=0)
    output = llm.generate({"prompt_token_ids": PROMPTS[0]}, params, use_tqdm=False)[0].outputs[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sequence = PROMPTS[0] + list(output.token_ids)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([sequence])).logits[0].float(), dim=-1)
    for step, token_id in enumerate(output.token_ids):
        expected = logprobs[len(PROMPTS[0]) - 1 + step, token_id].item()
        assert math.isclose(output.logprobs[step][token_id].logprob, expected, abs_tol=1e-4), step


def test_two_ranks_match_one_rank_and_transformers_for_every_family(tmp_path):
    """Per family (one two-rank LLM each, as process start-up dominates): greedy tokens equal
    transformers' and one rank's; each worker read only its shards of the checkpoint; and for
    Llama, built with seed=None so each rank would pick its own generator seed, random
    sampling keeps the ranks in step."""
    assert set(VARIANTS) == set(FAMILIES)
    for family in FAMILIES:
        path = make_tiny_checkpoint(tmp_path / family, family, seed=5, **VARIANTS[family])
        expected = hf_greedy(path, PROMPTS, MAX_TOKENS)
        one_rank = LLM(str(path), **ENGINE)
        assert _tokens(one_rank) == expected, family
        one_rank.shutdown()
        start = time.perf_counter()
        two_ranks = LLM(str(path), tensor_parallel_size=2, seed=None if family == "llama" else 0, **ENGINE)
        try:
            assert two_ranks.llm_engine.config.parallel_config.distributed_executor_backend == "mp"
            assert _tokens(two_ranks) == expected, family
            read = two_ranks.llm_engine.executor.collective_rpc("loaded_weight_bytes")
            assert read == [_expected_bytes_per_rank(path, VARIANTS[family]["num_key_value_heads"], 2)] * 2, family
            if family == "llama":
                _check_sampled_logprobs_match_transformers(two_ranks, path)
        finally:
            two_ranks.shutdown()
        print(f"{family}: two-rank LLM start, generate and shutdown took {time.perf_counter() - start:.1f} s")


def _write_config(tmp_path, **overrides):
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=1,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    config.architectures = ["LlamaForCausalLM"]
    tmp_path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize(
    ("tp_size", "overrides", "message"),
    [
        (4, {}, r"num_attention_heads \(6\) .* tensor_parallel_size \(4\).*\[1, 2, 6\]"),
        (3, {}, r"num_key_value_heads \(2\) .* tensor_parallel_size \(3\) do not divide"),
        (2, {"intermediate_size": 191}, r"intermediate_size \(191\) .* tensor_parallel_size \(2\)"),
    ],
    ids=["heads", "kv-heads", "intermediate"],
)
def test_a_model_that_cannot_be_split_fails_in_config_validation(tmp_path, tp_size, overrides, message):
    folder = _write_config(tmp_path, **overrides)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        EngineArgs.from_kwargs(folder, load_format="dummy", tensor_parallel_size=tp_size, device="cpu").create_engine_config()
    assert time.perf_counter() - start < 2.0  # no process was started


def test_more_ranks_than_kv_heads_is_accepted_when_they_divide(tmp_path):
    folder = _write_config(tmp_path, num_attention_heads=4, num_key_value_heads=1, hidden_size=64)
    config = EngineArgs.from_kwargs(folder, load_format="dummy", tensor_parallel_size=4, device="cpu").create_engine_config()
    assert config.parallel_config.tensor_parallel_size == 4


def test_uni_backend_with_two_ranks_is_rejected(tmp_path):
    folder = _write_config(tmp_path)
    with pytest.raises(ValueError, match="distributed_executor_backend='uni'.*tensor_parallel_size=2"):
        EngineArgs.from_kwargs(
            folder, load_format="dummy", tensor_parallel_size=2, distributed_executor_backend="uni", device="cpu"
        ).create_engine_config()
    assert json.loads((tmp_path / "config.json").read_text())["num_attention_heads"] == 6
