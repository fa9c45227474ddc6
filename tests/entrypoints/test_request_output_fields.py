"""RequestOutput fields (num_cached_tokens, metrics), prompt dict keys (cache_salt, unknown
keys), and the request-level token controls end to end."""

from __future__ import annotations

import pytest
from tiny_models import make_tiny_checkpoint

from pagedllm import LLM, SamplingParams
from pagedllm.engine.token_controls import tokenize_bad_words

LONG_PROMPT = list(range(3, 3 + 40))  # two full blocks of 16, and a partial one


@pytest.fixture(scope="module")
def llm(tmp_path_factory, tiny_bpe_tokenizer_dir) -> LLM:
    path = make_tiny_checkpoint(
        tmp_path_factory.mktemp("fields") / "model", "llama", vocab_size=512,
        tokenizer_dir=tiny_bpe_tokenizer_dir, seed=2,
    )
    return LLM(str(path), dtype="float32", kv_cache_memory_bytes=1 << 22)


def _run(llm, prompt, **params):
    params.setdefault("max_tokens", 4)
    return llm.generate(prompt, SamplingParams(temperature=0, ignore_eos=True, **params), use_tqdm=False)[0]


def test_num_cached_tokens_counts_prefix_cache_hits_and_cache_salt_separates_them(llm):
    llm.reset_prefix_cache()
    first = _run(llm, {"prompt_token_ids": LONG_PROMPT})
    again = _run(llm, {"prompt_token_ids": LONG_PROMPT})
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 32
    salted = _run(llm, {"prompt_token_ids": LONG_PROMPT, "cache_salt": "user-a"})
    assert salted.num_cached_tokens == 0
    assert _run(llm, {"prompt_token_ids": LONG_PROMPT, "cache_salt": "user-a"}).num_cached_tokens == 32
    assert _run(llm, {"prompt_token_ids": LONG_PROMPT, "cache_salt": "user-b"}).num_cached_tokens == 0
    assert salted.outputs[0].token_ids == first.outputs[0].token_ids
    assert _run(llm, {"prompt_token_ids": LONG_PROMPT}, skip_reading_prefix_cache=True).num_cached_tokens == 0


def test_metrics_are_ordered_timestamps(llm):
    output = _run(llm, "hello world", max_tokens=5)
    metrics = output.metrics
    assert metrics.arrival_time <= metrics.first_scheduled_time <= metrics.first_token_time
    assert metrics.first_token_time <= metrics.last_token_time <= metrics.finished_time
    assert metrics.time_in_queue >= 0 and metrics.prefill_time >= 0 and metrics.num_generation_tokens == 5
    assert output.kv_transfer_params is None and output.encoder_prompt is None and output.lora_request is None


def test_unknown_prompt_key_is_a_value_error_and_known_keys_pass(llm):
    with pytest.raises(ValueError, match="promt"):
        llm.generate({"promt": "typo"}, use_tqdm=False)
    assert _run(llm, {"prompt": "hello", "mm_processor_kwargs": {}}).finished


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm):
    output = _run(llm, {"prompt_token_ids": LONG_PROMPT}, truncate_prompt_tokens=5)
    assert output.prompt_token_ids == LONG_PROMPT[-5:]
    assert output.outputs[0].token_ids == _run(llm, {"prompt_token_ids": LONG_PROMPT[-5:]}).outputs[0].token_ids


def test_bad_words_and_allowed_token_ids_end_to_end(llm):
    tokenizer = llm.get_tokenizer()
    free = _run(llm, "the paged attention", max_tokens=12).outputs[0].token_ids
    # A word of the free output that is one token on its own: banning it must change the output.
    word = next(
        text for t in free
        if (text := tokenizer.decode([t]).strip()) and tokenizer.encode(text, add_special_tokens=False) == [t]
    )
    banned = _run(llm, "the paged attention", max_tokens=12, bad_words=[word]).outputs[0].token_ids
    bad_sequences = tokenize_bad_words([word], tokenizer)
    assert banned != free
    for sequence in bad_sequences:
        assert not any(banned[i : i + len(sequence)] == sequence for i in range(len(banned)))
    allowed = [10, 20, 30]
    assert set(_run(llm, "hello", max_tokens=6, allowed_token_ids=allowed).outputs[0].token_ids) <= set(allowed)
    biased = _run(llm, "hello", max_tokens=3, logit_bias={77: 100})
    assert biased.outputs[0].token_ids == [77, 77, 77]
    with pytest.raises(ValueError, match="allowed_token_ids"):
        _run(llm, "hello", allowed_token_ids=[10**6])
