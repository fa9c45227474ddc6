"""End to end: LLM.generate gives transformers' greedy tokens and logits, for every family and
every way a step can be cut (prefix-cache hits, chunked prefill, preemption)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import FAMILIES, hf_greedy, make_tiny_checkpoint

from pagedllm import LLM, SamplingParams

# Prompts of different lengths, two of them sharing a 40-token prefix (2.5 blocks of 16).
SHARED_PREFIX = [(7 * i) % 380 + 3 for i in range(40)]
PROMPTS = [
    [5, 17, 99, 23, 8],
    SHARED_PREFIX + [11, 12, 13],
    list(range(30, 100)),
    SHARED_PREFIX + [200, 201],
    [300],
]
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def token_prompts(prompts: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in prompts]


def generate_tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    outputs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def hf_reference(tiny_checkpoints: dict[str, Path]) -> dict[str, list[list[int]]]:
    return {family: hf_greedy(path, PROMPTS, MAX_TOKENS) for family, path in tiny_checkpoints.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_for_a_mixed_batch(tiny_checkpoints, hf_reference, family):
    llm = LLM(str(tiny_checkpoints[family]), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 24)
    assert generate_tokens(llm, PROMPTS) == hf_reference[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_logprobs_match_transformers_log_softmax(tiny_checkpoints, family):
    """The prefill's logits, seen through prompt_logprobs, are transformers' within 1e-4."""
    path = tiny_checkpoints[family]
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 24)
    prompt = PROMPTS[2]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5)
    output = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert output.prompt_logprobs[0] is None
    assert len(output.prompt_logprobs) == len(prompt)
    for position in range(1, len(prompt)):
        entry = output.prompt_logprobs[position]
        expected_row = reference[position - 1]
        assert prompt[position] in entry
        for token_id, logprob in entry.items():
            assert math.isclose(logprob.logprob, expected_row[token_id].item(), abs_tol=1e-4)
        top5 = expected_row.topk(5).indices.tolist()
        assert set(top5) <= set(entry)


def test_prefix_cache_hits_give_identical_tokens(tiny_checkpoints, hf_reference):
    llm = LLM(str(tiny_checkpoints["llama"]), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 24)
    first = generate_tokens(llm, PROMPTS)
    # Second pass: every prompt's full blocks are now cached.
    second = llm.generate(token_prompts(PROMPTS), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in second] == first == hf_reference["llama"]
    scheduler = llm.llm_engine.scheduler
    assert scheduler.kv_cache_manager.prefix_cache_stats.num_hit_tokens > 0


def test_chunked_prefill_gives_identical_tokens(tiny_checkpoints, hf_reference):
    llm = LLM(
        str(tiny_checkpoints["qwen2"]), skip_tokenizer_init=True, dtype="float32",
        kv_cache_memory_bytes=1 << 24, max_num_batched_tokens=16, enable_prefix_caching=False,
    )
    assert generate_tokens(llm, PROMPTS) == hf_reference["qwen2"]


def test_preemption_by_recompute_gives_identical_tokens(tiny_checkpoints, hf_reference, caplog):
    llm = LLM(str(tiny_checkpoints["qwen3"]), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 20)
    block_bytes = llm.llm_engine.executor.collective_rpc("kv_cache_block_bytes")[0]
    del llm
    # Room for 8 blocks (128 tokens): enough for the longest request alone, not for all five.
    llm = LLM(
        str(tiny_checkpoints["qwen3"]), skip_tokenizer_init=True, dtype="float32",
        kv_cache_memory_bytes=8 * block_bytes, max_model_len=128, enable_prefix_caching=False,
    )
    with caplog.at_level("WARNING", logger="pagedllm"):
        assert generate_tokens(llm, PROMPTS) == hf_reference["qwen3"]
    assert any("preempted" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    "variant",
    [
        dict(tie_word_embeddings=True),
        dict(num_key_value_heads=1),
        dict(max_shard_size="40KB"),
        dict(safe_serialization=False),
    ],
    ids=["tied", "mqa", "sharded-safetensors", "pytorch-bin"],
)
def test_checkpoint_variants_match_transformers(tmp_path, variant):
    path = make_tiny_checkpoint(tmp_path / "model", "llama", seed=3, **variant)
    expected = hf_greedy(path, PROMPTS[:3], MAX_TOKENS)
    llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 24)
    assert generate_tokens(llm, PROMPTS[:3]) == expected


def test_outputs_keep_input_order_and_n_completions(tiny_checkpoints):
    llm = LLM(str(tiny_checkpoints["llama"]), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 24)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True)
    outputs = llm.generate(token_prompts(PROMPTS), params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == PROMPTS
    for output in outputs:
        assert [c.index for c in output.outputs] == [0, 1, 2]
        assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for c in output.outputs)
        assert output.finished
    again = llm.generate(token_prompts(PROMPTS), params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in again] == [[c.token_ids for c in o.outputs] for o in outputs]


def test_linear_rope_scaling_extends_max_model_len_and_matches_transformers_past_it(tmp_path):
    """max_position_embeddings 512 with linear scaling by 2: vLLM's max_model_len is 1,024, and a
    prompt past 512 positions gives transformers' greedy tokens."""
    import json

    path = make_tiny_checkpoint(tmp_path / "linear", "llama", seed=3)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    config.pop("rope_scaling", None)
    (path / "config.json").write_text(json.dumps(config))
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 22)
    assert llm.llm_engine.model_config.max_model_len == 1024
    prompt = [3 + (i * 7) % 300 for i in range(700)]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == hf_greedy(path, [prompt], 4)[0]
    llm.shutdown()


def test_num_gpu_blocks_override_sizes_the_cache_and_preemption_keeps_the_tokens(tiny_checkpoints, hf_reference,
                                                                                caplog):
    """vLLM's knob for a small cache: 8 blocks (128 tokens), whatever the budget, for five
    prompts that together need more, so requests are preempted and recomputed."""
    llm = LLM(str(tiny_checkpoints["qwen3"]), skip_tokenizer_init=True, dtype="float32", max_model_len=128,
              num_gpu_blocks_override=8, enable_prefix_caching=False)
    assert llm.llm_engine.cache_config.num_gpu_blocks == 8
    with caplog.at_level("WARNING", logger="pagedllm"):
        assert generate_tokens(llm, PROMPTS) == hf_reference["qwen3"]
    assert any("preempted" in record.getMessage() for record in caplog.records)
    llm.shutdown()
