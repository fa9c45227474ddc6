"""Bad input gets a clear ValueError before any work starts; the engine stays usable."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(
        str(tiny_checkpoints["llama"]), skip_tokenizer_init=True, dtype="float32",
        kv_cache_memory_bytes=1 << 22, max_model_len=64,
    )


GOOD = {"prompt_token_ids": [5, 6, 7]}


@pytest.mark.parametrize(
    "bad_prompt, message",
    [
        ({"prompt_token_ids": []}, "empty"),
        ({"prompt_token_ids": list(range(3, 70))}, "67 tokens, but max_model_len is 64"),
        ({"prompt_token_ids": [5, 384]}, "Token id 384 is outside"),
        ({"prompt_token_ids": [-1]}, "Token id -1 is outside"),
        ("text without a tokenizer", "skip_tokenizer_init"),
    ],
)
def test_bad_prompt_in_a_batch_fails_before_any_work(llm, bad_prompt, message):
    with pytest.raises(ValueError, match=message) as error:
        llm.generate([GOOD, bad_prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    assert "Prompt 1" in str(error.value)
    assert not llm.llm_engine.has_unfinished_requests()
    # The engine still serves the good prompt afterwards.
    assert len(llm.generate(GOOD, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids) == 2


def test_logprobs_above_max_logprobs_is_rejected(llm):
    with pytest.raises(ValueError, match="max_logprobs=20"):
        llm.generate(GOOD, SamplingParams(logprobs=50), use_tqdm=False)


def test_sampling_params_list_must_match_prompts(llm):
    with pytest.raises(ValueError, match="2 sampling_params for 1 prompts"):
        llm.generate([GOOD], [SamplingParams(), SamplingParams()], use_tqdm=False)


def test_bad_request_added_to_a_running_engine_leaves_others_running(llm):
    engine = llm.llm_engine
    engine.add_request("good", GOOD, SamplingParams(max_tokens=3, ignore_eos=True))
    with pytest.raises(ValueError):
        engine.add_request("bad", {"prompt_token_ids": [999]}, SamplingParams())
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["good"]
    assert len(finished[0].outputs[0].token_ids) == 3


def test_max_model_len_that_does_not_fit_the_kv_cache_names_both_numbers(tiny_checkpoints):
    # kv_cache_memory_bytes decides the budget alone, so the error names it and the bytes that fit.
    with pytest.raises(ValueError, match=r"holds 16 tokens.*max_model_len is 512.*"
                                         r"raise kv_cache_memory_bytes \(now 8,192\) to at least 262,144"):
        LLM(str(tiny_checkpoints["llama"]), skip_tokenizer_init=True, dtype="float32",
            kv_cache_memory_bytes=2 * 2 * 16 * 2 * 16 * 4)
    LLM(str(tiny_checkpoints["llama"]), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=262_144).shutdown()


def test_a_cache_that_fp8_would_fit_says_so(tiny_checkpoints):
    # float32 KV holding 128 tokens; one byte a value holds 512 = max_model_len.
    budget = 8 * 2 * 2 * 16 * 2 * 16 * 4
    with pytest.raises(ValueError, match=r"holds 128 tokens.*kv_cache_dtype='fp8' \(one byte a value instead of 4: 512 tokens\)"):
        LLM(str(tiny_checkpoints["llama"]), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=budget)
    llm = LLM(str(tiny_checkpoints["llama"]), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=budget,
              kv_cache_dtype="fp8")
    out = llm.generate({"prompt_token_ids": [3 + i % 300 for i in range(500)]}, SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 2


def test_unknown_architecture_lists_the_supported_ones(tmp_path):
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(tmp_path), skip_tokenizer_init=True, load_format="dummy")


def test_a_prompt_of_max_model_len_tokens_says_it_in_vllms_words_and_bad_swap_space(tiny_checkpoints):
    llm = LLM(str(tiny_checkpoints["llama"]), skip_tokenizer_init=True, dtype="float32", max_model_len=64,
              kv_cache_memory_bytes=1 << 22)
    with pytest.raises(ValueError, match="longer than the maximum model length of 64"):
        llm.generate({"prompt_token_ids": list(range(3, 67))}, use_tqdm=False)
    llm.shutdown()
    with pytest.raises(ValueError, match="swap_space must be a number of GiB >= 0"):
        LLM(str(tiny_checkpoints["llama"]), skip_tokenizer_init=True, swap_space=-1)
