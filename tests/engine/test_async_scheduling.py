"""Async scheduling (step N+1 scheduled and queued before step N's tokens reach the host) gives
exactly the tokens, logprobs and finish reasons of synchronous scheduling: greedy and seeded
sampling, for every family, with prefix caching, chunked prefill, preemption, n > 1, penalties,
stop tokens, stop strings, max_tokens, EOS and aborts; and it discards, never returns, the one
speculative step computed for a request that had already ended."""

from __future__ import annotations

import math

import pytest
import transformers
from tiny_models import FAMILIES, hf_greedy, make_tiny_checkpoint

from pagedllm import LLM, SamplingParams
from pagedllm.engine.llm_engine import LLMEngine

ENGINE = dict(skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 22)
SHARED = list(range(40, 80))
# A shared 40-token prefix (prefix-cache hits), a prompt longer than the 32-token step budget
# (chunked prefill), and short ones.
PROMPTS = [SHARED + [5, 6], SHARED + [7], list(range(100, 170)), [300, 301], [9]]
MAX_TOKENS = [12, 7, 10, 1, 9]


def _params() -> list[SamplingParams]:
    """Greedy, seeded random (with n=2), penalties and logprobs mixed in one batch."""
    return [
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS[0], ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, n=2, max_tokens=MAX_TOKENS[1], ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS[2], ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS[3], ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=MAX_TOKENS[4], ignore_eos=True,
                       presence_penalty=0.5, min_tokens=4),
    ]


def _generate(llm: LLM, params: list[SamplingParams] | SamplingParams) -> list[list[tuple]]:
    """Per prompt, per completion: (token ids, finish reason, stop reason, logprobs as
    [{token id: logprob}] or None)."""
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [
        [(tuple(c.token_ids), c.finish_reason, c.stop_reason,
          None if c.logprobs is None else [{k: v.logprob for k, v in lp.items()} for lp in c.logprobs])
         for c in o.outputs]
        for o in outputs
    ]


def _assert_same(got: list[list[tuple]], expected: list[list[tuple]]) -> None:
    """Tokens and finish reasons equal; logprobs equal within 1e-4 (batches differ between the
    two schedulings after a preemption, so float sums may be ordered differently)."""
    assert [[c[:3] for c in o] for o in got] == [[c[:3] for c in o] for o in expected]
    for got_prompt, expected_prompt in zip(got, expected):
        for got_completion, expected_completion in zip(got_prompt, expected_prompt):
            got_lps, expected_lps = got_completion[3], expected_completion[3]
            assert (got_lps is None) == (expected_lps is None)
            for got_step, expected_step in zip(got_lps or [], expected_lps or []):
                assert got_step.keys() == expected_step.keys()
                for token_id, logprob in expected_step.items():
                    assert math.isclose(got_step[token_id], logprob, abs_tol=1e-4)


def _both(path, **engine) -> tuple[LLM, LLM]:
    options = {**ENGINE, **engine}
    return LLM(str(path), async_scheduling=False, **options), LLM(str(path), **options)


@pytest.mark.parametrize("family", FAMILIES)
def test_async_scheduling_gives_the_tokens_of_sync_scheduling(tiny_checkpoints, family):
    """Chunked prefill (32-token steps) and prefix caching on, a mixed batch twice (the second
    run hits the cache); the async engine is on by default and its greedy tokens equal
    transformers'."""
    sync, asynchronous = _both(tiny_checkpoints[family], max_num_batched_tokens=32)
    assert asynchronous.llm_engine.engine_core.async_scheduling
    assert not sync.llm_engine.engine_core.async_scheduling
    for _ in range(2):
        _assert_same(_generate(asynchronous, _params()), _generate(sync, _params()))
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    tokens = [list(o.outputs[0].token_ids) for o in asynchronous.generate(
        [{"prompt_token_ids": p} for p in PROMPTS], greedy, use_tqdm=False)]
    assert tokens == hf_greedy(tiny_checkpoints[family], PROMPTS, 8)
    # Nothing is left behind: the speculative steps were drained and every worker row dropped.
    for llm in (sync, asynchronous):
        assert not llm.llm_engine.has_unfinished_requests()
        llm.llm_engine.engine_core.step()
        assert llm.llm_engine.executor.worker.model_runner.input_batch.num_reqs == 0


def test_preempted_requests_give_identical_tokens(tiny_checkpoints):
    """A KV cache of 6 blocks of 16 tokens cannot hold the batch: requests are preempted and
    recomputed, with steps in flight whose tokens are discarded and sampled again."""
    sync, asynchronous = _both(tiny_checkpoints["llama"], kv_cache_memory_bytes=6 * 16 * 2 * 2 * 2 * 16 * 4, max_model_len=96)
    _assert_same(_generate(asynchronous, _params()), _generate(sync, _params()))
    assert asynchronous.llm_engine.scheduler.num_preemptions > 0


def test_a_prefix_computed_by_the_step_in_flight_is_a_cache_hit_as_under_sync(tiny_checkpoints):
    """The second prompt is admitted while the step computing the first one's first block is
    in flight: it hits that block under both schedulings (blocks are shared once scheduled)."""
    sync, asynchronous = _both(tiny_checkpoints["llama"], max_num_batched_tokens=16)
    prompts = [{"prompt_token_ids": list(range(3, 31))}, {"prompt_token_ids": list(range(3, 34))}]
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    results = [[(o.num_cached_tokens, o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
               for llm in (sync, asynchronous)]
    assert results[0] == results[1]
    assert [cached for cached, _ in results[1]] == [0, 16]


@pytest.mark.parametrize("engine", [dict(), dict(max_num_batched_tokens=16), dict(async_scheduling=False)])
def test_prompt_logprobs_come_once_per_prompt_token_through_preemptions(tiny_checkpoints, engine):
    """A preempted request is recomputed from its first token, which scores its prompt again:
    those rows are not sent twice, so every prompt has exactly one entry per token, equal to
    an unpreempted run's (1e-4)."""
    path = tiny_checkpoints["llama"]
    prompts = [{"prompt_token_ids": [(7 * i + j) % 380 + 3 for j in range(40 + 5 * i)]} for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, prompt_logprobs=0)

    def rows(llm: LLM) -> list[list]:
        return [[None if row is None else {t: lp.logprob for t, lp in row.items()} for row in o.prompt_logprobs]
                for o in llm.generate(prompts, params, use_tqdm=False)]

    expected = rows(LLM(str(path), skip_tokenizer_init=True, dtype="float32", max_model_len=256))
    small = LLM(str(path), skip_tokenizer_init=True, dtype="float32", max_model_len=256,
                kv_cache_memory_bytes=20 * 16 * 2 * 2 * 2 * 16 * 4, **engine)
    got = rows(small)
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert [len(g) for g in got] == [len(p["prompt_token_ids"]) for p in prompts]
    for got_prompt, expected_prompt in zip(got, expected):
        for got_row, expected_row in zip(got_prompt, expected_prompt):
            assert (got_row is None) == (expected_row is None)
            if got_row is not None:
                assert got_row.keys() == expected_row.keys()
                assert all(math.isclose(got_row[t], expected_row[t], abs_tol=1e-4) for t in got_row)


def test_stop_tokens_and_max_tokens_end_requests_where_sync_does(tiny_checkpoints):
    """A stop token taken from the unstopped output ends the request right after it, under
    both schedulings; max_tokens=1 and 2 give exactly 1 and 2 tokens."""
    sync, asynchronous = _both(tiny_checkpoints["qwen3"])
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    full = _generate(sync, greedy)
    params = []
    for completions in full:
        tokens = completions[0][0]
        params.append(SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[tokens[3]]))
    stopped = _generate(sync, params)
    assert _generate(asynchronous, params) == stopped
    for completions, original in zip(stopped, full):
        tokens, reason, stop_reason, _ = completions[0]
        assert reason == "stop" and tokens[-1] == stop_reason
        assert tokens == original[0][0][: original[0][0].index(stop_reason) + 1]
    for max_tokens in (1, 2):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        result = _generate(asynchronous, params)
        assert result == _generate(sync, params)
        assert all(len(c[0][0]) == max_tokens and c[0][1] == "length" for c in result)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, tiny_bpe_tokenizer_dir):
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("async_text") / "model", "qwen3", vocab_size=512,
        tokenizer_dir=tiny_bpe_tokenizer_dir, seed=5,
    )


def test_stop_strings_and_eos_end_requests_where_sync_does(text_model):
    """Stop strings (found by the output processor while the next step runs) and EOS cut the
    text at the same place under both schedulings."""
    engine = dict(dtype="float32", kv_cache_memory_bytes=1 << 22)
    sync = LLM(str(text_model), async_scheduling=False, **engine)
    asynchronous = LLM(str(text_model), **engine)
    prompts = ["hello world", "the paged attention model", "stop"]
    free = sync.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    stops = [o.outputs[0].text[4:7] for o in free]
    params = [SamplingParams(temperature=0, max_tokens=24, stop=[s]) for s in stops]
    params.append(SamplingParams(temperature=0.8, seed=11, max_tokens=24))  # EOS may end it
    prompts.append("eos")
    expected = [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason)
                for o in sync.generate(prompts, params, use_tqdm=False)]
    got = [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason)
           for o in asynchronous.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert all(reason == "stop" for _, _, reason in expected[:3])


def test_abort_ends_a_request_and_discards_its_step_in_flight(tiny_checkpoints):
    """Aborting a request while its next step is in flight: the other request's tokens are
    unchanged, the aborted one gets nothing more, and no state is left on the workers."""
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    reference = LLMEngine.from_engine_args(str(tiny_checkpoints["qwen2"]), async_scheduling=False, **ENGINE)
    engine = LLMEngine.from_engine_args(str(tiny_checkpoints["qwen2"]), **ENGINE)
    for llm_engine in (reference, engine):
        llm_engine.add_request("keep", {"prompt_token_ids": PROMPTS[0]}, greedy)
        llm_engine.add_request("abort", {"prompt_token_ids": PROMPTS[2]}, greedy)
    final: dict[str, dict[str, list[int]]] = {"reference": {}, "async": {}}
    for name, llm_engine in (("reference", reference), ("async", engine)):
        aborted = False
        while llm_engine.has_unfinished_requests():
            for output in llm_engine.step():
                final[name][output.request_id] = list(output.outputs[0].token_ids)
            if not aborted and len(final[name].get("abort", [])) >= 3:
                llm_engine.abort_request("abort")
                aborted = True
                tokens_at_abort = list(final[name]["abort"])
        assert aborted
        assert final[name]["abort"] == tokens_at_abort
        llm_engine.engine_core.step()  # sends the last finished ids to the workers
        assert llm_engine.executor.worker.model_runner.input_batch.num_reqs == 0
    assert final["async"]["keep"] == final["reference"]["keep"]
    assert final["async"]["abort"] == final["reference"]["abort"][:3]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_request_id_reused_after_an_abort_gets_only_its_own_tokens(tiny_checkpoints, async_scheduling):
    """The aborted request's step in flight must not hand its token to the new request of the
    same id (the engine keys its requests by an id unique to each admission)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    engine = LLMEngine.from_engine_args(str(tiny_checkpoints["llama"]), async_scheduling=async_scheduling, **ENGINE)
    engine.add_request("fresh", {"prompt_token_ids": [50, 51]}, greedy)
    with pytest.raises(ValueError, match="already running"):
        engine.add_request("fresh", {"prompt_token_ids": [7]}, greedy)
    expected = _run_to_end(engine)["fresh"]
    engine.add_request("a", {"prompt_token_ids": [5, 6, 7, 8]},
                       SamplingParams(temperature=0.8, seed=1, max_tokens=30, ignore_eos=True))
    for _ in range(5):
        engine.step()
    engine.abort_request("a")
    engine.add_request("a", {"prompt_token_ids": [50, 51]}, greedy)
    assert _run_to_end(engine)["a"] == expected


def _run_to_end(engine: LLMEngine) -> dict[str, list[int]]:
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = list(output.outputs[0].token_ids)
    return finished


def test_sampled_logprobs_match_transformers_under_async_scheduling(tiny_checkpoints):
    """Random sampling with logprobs: each sampled token's logprob equals transformers' on
    the sampled sequence (1e-4), so the ids fed from the device are the ids reported."""
    path = tiny_checkpoints["llama"]
    llm = LLM(str(path), **ENGINE)
    params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, logprobs=0, seed=1)
    output = llm.generate({"prompt_token_ids": PROMPTS[3]}, params, use_tqdm=False)[0].outputs[0]
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sequence = PROMPTS[3] + list(output.token_ids)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([sequence])).logits[0].float(), dim=-1)
    for step, token_id in enumerate(output.token_ids):
        expected = logprobs[len(PROMPTS[3]) - 1 + step, token_id].item()
        assert math.isclose(output.logprobs[step][token_id].logprob, expected, abs_tol=1e-4), step


@pytest.mark.slow
def test_two_ranks_give_the_tokens_of_sync_scheduling(tiny_checkpoints):
    """tensor_parallel_size=2 (mp executor, gloo): async and sync give the same tokens."""
    path = tiny_checkpoints["llama"]
    results = []
    for async_scheduling in (False, True):
        llm = LLM(str(path), tensor_parallel_size=2, async_scheduling=async_scheduling,
                  max_num_batched_tokens=32, **ENGINE)
        try:
            results.append(_generate(llm, _params()))
        finally:
            llm.shutdown()
    _assert_same(results[1], results[0])


def test_options_default_to_async_scheduling_and_the_custom_all_reduce(tiny_checkpoints):
    from pagedllm.engine.arg_utils import EngineArgs

    path = str(tiny_checkpoints["llama"])
    config = EngineArgs.from_kwargs(path).create_engine_config()
    assert config.scheduler_config.async_scheduling is True
    assert config.parallel_config.disable_custom_all_reduce is False
    config = EngineArgs.from_kwargs(path, async_scheduling=False, disable_custom_all_reduce=True).create_engine_config()
    assert config.scheduler_config.async_scheduling is False
    assert config.parallel_config.disable_custom_all_reduce is True
