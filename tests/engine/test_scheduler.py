"""Scheduler: budgets, chunked prefill, mixed steps, preemption, prefix hits, stop rules.

No model: `FakeWorker` plays the workers' side of the SchedulerOutput protocol. It keeps its
own tokens and block table per request (as real workers do), writes each computed token's id
into a fake paged KV cache at its slot, then "attends" by reading every position back through
its block table and checking it holds the request's token: a prefix hit on a wrong block, a
block reused while still needed, or a stale block table all fail there. It samples a
deterministic function of the context it read, so any schedule must reproduce the tokens of
`reference_generate`, which runs one request alone without any cache.
"""

from __future__ import annotations

import logging
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.scheduler import EngineCoreOutput, Scheduler
from pagedllm.engine.scheduler_output import (
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    TokenLogprobs,
)

BLOCK_SIZE = 4
EOS = 1

NextToken = Callable[[str, list[int]], int]


def context_token(req_id: str, context: list[int]) -> int:
    """A model stand-in: depends on the whole context, never EOS (ids 0..9 are reserved)."""
    return (sum(context) * 31 + len(context) * 7) % 90 + 10


def make_scheduler(
    num_blocks: int = 64,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 128,
    enable_prefix_caching: bool = True,
) -> Scheduler:
    return Scheduler(
        SimpleNamespace(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            async_scheduling=False,
        ),
        SimpleNamespace(block_size=BLOCK_SIZE, enable_prefix_caching=enable_prefix_caching),
        num_blocks,
    )


def make_request(req_id: str, prompt: list[int], max_tokens: int = 8, **params: object) -> Request:
    sampling_params = SamplingParams(max_tokens=max_tokens, **params)  # type: ignore[arg-type]
    return Request(req_id, list(prompt), sampling_params, eos_token_id=EOS, max_tokens=max_tokens)


@dataclass
class _WorkerState:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    wants_prompt_logprobs: bool


@dataclass
class FakeWorker:
    num_blocks: int
    next_token: NextToken = context_token
    states: dict[str, _WorkerState] = field(default_factory=dict)
    kv_slots: dict[int, int] = field(default_factory=dict)
    """Slot -> the token id whose KV it holds."""

    def _slot(self, state: _WorkerState, position: int) -> int:
        block_id = state.block_ids[position // BLOCK_SIZE]
        assert 0 <= block_id < self.num_blocks
        return block_id * BLOCK_SIZE + position % BLOCK_SIZE

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in out.finished_req_ids:
            self.states.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.states
            self.states[new.req_id] = _WorkerState(
                list(new.token_ids),
                list(new.block_ids),
                new.num_computed_tokens,
                new.sampling_params.prompt_logprobs is not None,
            )
        for cached in out.scheduled_cached_reqs:
            state = self.states[cached.req_id]
            assert state.num_computed_tokens == cached.num_computed_tokens
            state.block_ids.extend(cached.new_block_ids)
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        # Write every scheduled token's KV first, then read, as each attention layer does.
        written: set[int] = set()
        for req_id, num_tokens in out.num_scheduled_tokens.items():
            state = self.states[req_id]
            start = state.num_computed_tokens
            assert num_tokens > 0 and start + num_tokens <= len(state.token_ids)
            for pos in range(start, start + num_tokens):
                slot = self._slot(state, pos)
                assert slot not in written, "two requests write the same KV slot"
                written.add(slot)
                self.kv_slots[slot] = state.token_ids[pos]
        result = ModelRunnerOutput(sampled_token_ids={})
        for req_id, num_tokens in out.num_scheduled_tokens.items():
            state = self.states[req_id]
            start, end = state.num_computed_tokens, state.num_computed_tokens + num_tokens
            context = [self.kv_slots.get(self._slot(state, pos)) for pos in range(end)]
            assert context == state.token_ids[:end], f"{req_id} read wrong KV"
            state.num_computed_tokens = end
            if state.wants_prompt_logprobs and start < len(state.token_ids) - 1:
                positions = range(start, min(end, len(state.token_ids) - 1))
                result.prompt_logprobs[req_id] = TokenLogprobs(
                    [[state.token_ids[p + 1]] for p in positions], [[-1.0] for _ in positions], [1] * len(positions)
                )
            if end == len(state.token_ids):
                token = self.next_token(req_id, context)  # type: ignore[arg-type]
                state.token_ids.append(token)
                result.sampled_token_ids[req_id] = [token]
            else:
                result.sampled_token_ids[req_id] = []
        return result


@dataclass
class Run:
    outputs: dict[str, list[EngineCoreOutput]] = field(default_factory=dict)
    steps: list[SchedulerOutput] = field(default_factory=list)

    def tokens(self, req_id: str) -> list[int]:
        return [t for o in self.outputs[req_id] for t in o.new_token_ids]

    def final(self, req_id: str) -> EngineCoreOutput:
        return self.outputs[req_id][-1]


def run_to_completion(scheduler: Scheduler, worker: FakeWorker, max_steps: int = 1000) -> Run:
    run = Run()
    for _ in range(max_steps):
        if not (scheduler.has_unfinished_requests() or scheduler.has_finished_requests()):
            break
        out = scheduler.schedule()
        run.steps.append(out)
        for o in scheduler.update_from_output(out, worker.execute(out)):
            assert not any(prev.finished for prev in run.outputs.get(o.request_id, []))
            run.outputs.setdefault(o.request_id, []).append(o)
        for req in scheduler.running:  # the workers' copy of the tokens never drifts
            assert worker.states[req.request_id].token_ids == req.all_token_ids
    else:
        raise AssertionError("requests did not finish")
    assert worker.states == {}, "workers were not told about every finished request"
    return run


def reference_generate(prompt: list[int], max_tokens: int, max_model_len: int) -> list[int]:
    context, output = list(prompt), []
    while len(output) < max_tokens and len(context) < max_model_len:
        token = context_token("", context)
        context.append(token)
        output.append(token)
    return output


def test_scheduler_imports_no_torch() -> None:
    code = "import sys, pagedllm.engine.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_scheduler_accepts_the_real_configs() -> None:
    from pagedllm.config import CacheConfig, SchedulerConfig

    scheduler = Scheduler(SchedulerConfig(), CacheConfig(), 100)
    assert scheduler.block_size == CacheConfig().block_size
    assert scheduler.max_num_batched_tokens == SchedulerConfig().max_num_batched_tokens


def test_budget_and_max_num_seqs_are_respected() -> None:
    scheduler = make_scheduler(max_num_seqs=3, max_num_batched_tokens=20)
    for i in range(5):
        scheduler.add_request(make_request(f"r{i}", [20 + i] * 9, max_tokens=3))
    run = run_to_completion(scheduler, FakeWorker(64))
    for out in run.steps:
        assert out.total_num_scheduled_tokens <= 20
        assert len(out.num_scheduled_tokens) <= 3
    first = run.steps[0]
    # 9 + 9 fit, the third prompt gets the 2 tokens left, the 4th waits for a free seat.
    assert list(first.num_scheduled_tokens.items()) == [("r0", 9), ("r1", 9), ("r2", 2)]
    for i in range(5):
        assert run.tokens(f"r{i}") == reference_generate([20 + i] * 9, 3, 128)


def test_chunked_prefill_progresses_a_long_prompt_over_several_steps() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=16)
    prompt = list(range(10, 50))
    scheduler.add_request(make_request("long", prompt, max_tokens=2))
    worker = FakeWorker(64)
    starts, chunks, tokens = [], [], []
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        data = out.scheduled_new_reqs or out.scheduled_cached_reqs
        starts.append(data[0].num_computed_tokens)
        chunks.append(out.num_scheduled_tokens["long"])
        tokens.append([t for o in scheduler.update_from_output(out, worker.execute(out)) for t in o.new_token_ids])
    assert (starts, chunks) == ([0, 16, 32, 40], [16, 16, 8, 1])
    # No token while the prompt is partial; one per step from the last chunk on.
    assert [len(t) for t in tokens] == [0, 0, 1, 1]
    assert sum(tokens, []) == reference_generate(prompt, 2, 128)


def test_one_step_mixes_a_decode_and_a_prefill_chunk() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=10)
    worker = FakeWorker(64)
    tokens: dict[str, list[int]] = {"a": [], "b": []}

    def step() -> SchedulerOutput:
        out = scheduler.schedule()
        for o in scheduler.update_from_output(out, worker.execute(out)):
            tokens[o.request_id] += o.new_token_ids
        return out

    scheduler.add_request(make_request("a", [11, 12, 13], max_tokens=4))
    step()
    scheduler.add_request(make_request("b", list(range(20, 40)), max_tokens=2))
    out = step()
    assert list(out.num_scheduled_tokens.items()) == [("a", 1), ("b", 9)]
    assert [c.req_id for c in out.scheduled_cached_reqs] == ["a"]
    assert out.scheduled_cached_reqs[0].num_computed_tokens == 3  # where this step's token sits
    assert [(n.req_id, n.num_computed_tokens) for n in out.scheduled_new_reqs] == [("b", 0)]
    while scheduler.has_unfinished_requests():
        step()
    assert tokens["a"] == reference_generate([11, 12, 13], 4, 128)
    assert tokens["b"] == reference_generate(list(range(20, 40)), 2, 128)


def test_preemption_frees_blocks_and_resumes_with_every_token(caplog: pytest.LogCaptureFixture) -> None:
    # 6 blocks of 4 tokens: two requests of 8 prompt tokens growing to 16 cannot both fit.
    scheduler = make_scheduler(num_blocks=6, enable_prefix_caching=False)
    worker = FakeWorker(6)
    prompts = {"first": [21] * 8, "second": [22] * 8}
    for req_id, prompt in prompts.items():
        scheduler.add_request(make_request(req_id, prompt, max_tokens=8))
    with caplog.at_level(logging.WARNING, logger="pagedllm.engine.scheduler"):
        run = run_to_completion(scheduler, worker)
    preempting = [i for i, out in enumerate(run.steps) if "second" in out.finished_req_ids]
    assert preempting, "the KV cache never ran out"
    step = preempting[0]
    assert "second" not in run.steps[step].num_scheduled_tokens
    resumed = next(
        new for out in run.steps[step + 1 :] for new in out.scheduled_new_reqs if new.req_id == "second"
    )
    assert isinstance(resumed, NewRequestData)
    num_output = len(resumed.token_ids) - resumed.num_prompt_tokens
    assert num_output > 0 and resumed.token_ids[: resumed.num_prompt_tokens] == prompts["second"]
    assert resumed.num_computed_tokens == 0  # prefix caching is off: everything is recomputed
    assert "was preempted by recompute" in caplog.text and "second" in caplog.text
    assert scheduler.num_preemptions >= 1
    for req_id, prompt in prompts.items():
        assert run.tokens(req_id) == reference_generate(prompt, 8, 128)
        assert run.final(req_id).finish_reason == "length"
    assert scheduler.kv_cache_manager.num_free_blocks == 6


def test_resumed_request_reuses_its_own_cached_blocks() -> None:
    scheduler = make_scheduler(num_blocks=6, enable_prefix_caching=True)
    worker = FakeWorker(6)
    for req_id in ("first", "second"):
        scheduler.add_request(make_request(req_id, [30 if req_id == "first" else 31] * 8, max_tokens=8))
    run = run_to_completion(scheduler, worker)
    resumed = [new for out in run.steps for new in out.scheduled_new_reqs if new.req_id == "second"][1:]
    assert resumed and resumed[0].num_computed_tokens > 0
    assert run.tokens("second") == reference_generate([31] * 8, 8, 128)


def test_prefix_hit_is_reported_and_skips_computation() -> None:
    scheduler = make_scheduler()
    worker = FakeWorker(64)
    shared = list(range(40, 53))  # 3 full blocks + 1 token
    scheduler.add_request(make_request("a", shared, max_tokens=2))
    run_a = run_to_completion(scheduler, worker)
    scheduler.add_request(make_request("b", shared[:12] + [7, 8], max_tokens=2))
    out = scheduler.schedule()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 12
    assert out.num_scheduled_tokens["b"] == 2
    scheduler.update_from_output(out, worker.execute(out))
    run_b = run_to_completion(scheduler, worker)
    assert run_b.final("b").num_cached_tokens == 12
    assert run_a.final("a").num_cached_tokens == 0
    assert run_b.final("b").new_token_ids[-1] == reference_generate(shared[:12] + [7, 8], 2, 128)[-1]


def test_prefix_hit_covers_only_blocks_already_computed() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=20)
    worker = FakeWorker(64)
    prompt = list(range(50, 80))
    scheduler.add_request(make_request("a", prompt, max_tokens=2))
    out = scheduler.schedule()
    scheduler.update_from_output(out, worker.execute(out))
    scheduler.add_request(make_request("b", prompt, max_tokens=2))
    out = scheduler.schedule()
    # a's first chunk (20 tokens, 5 blocks) is in the cache; its second chunk is being
    # computed in this very step, so b cannot count on it.
    assert list(out.num_scheduled_tokens.items()) == [("a", 10), ("b", 10)]
    assert out.scheduled_new_reqs[0].num_computed_tokens == 20
    first = {o.request_id: o.new_token_ids for o in scheduler.update_from_output(out, worker.execute(out))}
    run = run_to_completion(scheduler, worker)
    assert first["b"] + run.tokens("b") == reference_generate(prompt, 2, 128)


@pytest.mark.parametrize(
    ("script", "params", "expected_tokens", "finish_reason", "stop_reason"),
    [
        pytest.param([50, EOS, 51], {}, [50, EOS], "stop", None, id="eos"),
        pytest.param([EOS, 50, EOS, 52], {"min_tokens": 2}, [EOS, 50, EOS], "stop", None, id="min_tokens_delays_eos"),
        pytest.param([50, EOS, 51, 52], {"ignore_eos": True}, [50, EOS, 51, 52], "length", None, id="ignore_eos"),
        pytest.param([50, 7, 51], {"stop_token_ids": [7]}, [50, 7], "stop", 7, id="stop_token_id"),
        pytest.param([7, 50, 7], {"stop_token_ids": [7], "min_tokens": 2}, [7, 50, 7], "stop", 7, id="min_tokens_delays_stop_id"),
        pytest.param([50, 51, 52, 53, 54, 55], {}, [50, 51, 52, 53], "length", None, id="max_tokens"),
    ],
)
def test_stop_conditions(
    script: list[int], params: dict[str, object], expected_tokens: list[int], finish_reason: str, stop_reason: int | None
) -> None:
    scheduler = make_scheduler()
    worker = FakeWorker(64, next_token=lambda req_id, context: script[len(context) - 3])
    scheduler.add_request(make_request("r", [60, 61, 62], max_tokens=4, **params))
    run = run_to_completion(scheduler, worker)
    assert run.tokens("r") == expected_tokens
    assert (run.final("r").finish_reason, run.final("r").stop_reason) == (finish_reason, stop_reason)


def test_max_model_len_caps_the_sequence() -> None:
    scheduler = make_scheduler(max_model_len=10)
    scheduler.add_request(make_request("r", [60] * 7, max_tokens=100))
    run = run_to_completion(scheduler, FakeWorker(64))
    assert len(run.tokens("r")) == 3 and run.final("r").finish_reason == "length"


def test_finished_ids_are_reported_once_and_aborts_free_blocks() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    worker = FakeWorker(64)
    scheduler.add_request(make_request("done", [60] * 5, max_tokens=1))
    scheduler.add_request(make_request("running", [61] * 5, max_tokens=50))
    scheduler.add_request(make_request("waiting", [62] * 5, max_tokens=50))
    out = scheduler.schedule()
    outputs = scheduler.update_from_output(out, worker.execute(out))
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("done", "length")]
    out = scheduler.schedule()
    assert out.finished_req_ids == {"done"} and "running" in out.num_scheduled_tokens
    scheduler.update_from_output(out, worker.execute(out))
    scheduler.finish_requests(["running", "waiting", "unknown"], RequestStatus.FINISHED_ABORTED)
    scheduler.finish_requests("running", RequestStatus.FINISHED_ABORTED)  # ignored: gone
    assert not scheduler.has_unfinished_requests() and scheduler.has_finished_requests()
    assert scheduler.kv_cache_manager.usage == 0.0
    out = scheduler.schedule()
    assert out.finished_req_ids == {"running", "waiting"} and out.is_empty
    worker.execute(out)
    assert scheduler.schedule().finished_req_ids == set()
    assert worker.states == {}


def test_prompt_logprobs_are_emitted_for_every_chunk() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=5)
    scheduler.add_request(make_request("r", list(range(20, 32)), max_tokens=1, prompt_logprobs=0))
    run = run_to_completion(scheduler, FakeWorker(64))
    chunks = [o.new_prompt_logprobs for o in run.outputs["r"] if o.new_prompt_logprobs is not None]
    assert sum(len(c.ranks) for c in chunks) == 11  # every prompt position but the last
    assert len(run.outputs["r"]) == 3 and run.tokens("r") == reference_generate(list(range(20, 32)), 1, 128)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_random_load_matches_running_each_request_alone(seed: int, enable_prefix_caching: bool) -> None:
    rng = random.Random(seed)
    scheduler = make_scheduler(
        num_blocks=24,
        max_num_seqs=5,
        max_num_batched_tokens=24,
        max_model_len=40,
        enable_prefix_caching=enable_prefix_caching,
    )
    worker = FakeWorker(24)
    prefixes = [[rng.randrange(10, 100) for _ in range(rng.randrange(0, 13))] for _ in range(3)]
    expected = {}
    for i in range(30):
        prompt = rng.choice(prefixes) + [rng.randrange(10, 100) for _ in range(rng.randrange(1, 20))]
        max_tokens = rng.randrange(1, 20)
        scheduler.add_request(make_request(f"r{i}", prompt, max_tokens=max_tokens))
        expected[f"r{i}"] = reference_generate(prompt, max_tokens, 40)
    run = run_to_completion(scheduler, worker)
    for req_id, tokens in expected.items():
        assert run.tokens(req_id) == tokens, req_id
    assert scheduler.num_preemptions > 0
    assert (scheduler.kv_cache_manager.prefix_cache_stats.num_hit_tokens > 0) == enable_prefix_caching
    assert scheduler.kv_cache_manager.num_free_blocks == 24
