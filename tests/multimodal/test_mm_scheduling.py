"""The scheduler's multi-modal rules, without a model: the per-step encoder budget, and
unchunked items (bidirectional attention among an item's tokens) never split by chunked
prefill. Plain requests with placeholder features; no torch."""

from __future__ import annotations

from types import SimpleNamespace

from pagedllm.engine.request import Request
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.scheduler import Scheduler
from pagedllm.multimodal.inputs import MultiModalFeature, PlaceholderRange


def _scheduler(max_num_batched_tokens: int) -> Scheduler:
    scheduler_config = SimpleNamespace(max_num_seqs=8, max_num_batched_tokens=max_num_batched_tokens, max_model_len=512, async_scheduling=False)
    cache_config = SimpleNamespace(block_size=4, enable_prefix_caching=False)
    return Scheduler(scheduler_config, cache_config, num_kv_blocks=256)


def _request(req_id: str, num_tokens: int, items: list[tuple[int, int]], unchunked: bool) -> Request:
    request = Request(req_id, list(range(num_tokens)), SamplingParams(max_tokens=4), None, 4)
    request.mm_features = [
        MultiModalFeature("image", f"{req_id}-{i}", {}, PlaceholderRange(offset, length), unchunked=unchunked)
        for i, (offset, length) in enumerate(items)
    ]
    return request


def _chunks(scheduler: Scheduler, req_id: str, num_steps: int) -> list[int]:
    sizes = []
    for _ in range(num_steps):
        output = scheduler.schedule()
        sizes.append(output.num_scheduled_tokens.get(req_id, 0))
    return sizes


def test_unchunked_items_are_never_split():
    scheduler = _scheduler(max_num_batched_tokens=10)
    scheduler.add_request(_request("r", 30, [(3, 6), (12, 8)], unchunked=True))
    # [0, 10) holds [3, 9) whole and [10, 20) holds [12, 20) whole: no cut needed.
    assert _chunks(scheduler, "r", 3) == [10, 10, 10]
    scheduler = _scheduler(max_num_batched_tokens=10)
    scheduler.add_request(_request("r", 30, [(5, 8), (14, 9)], unchunked=True))
    # [0, 10) would split [5, 13): stop at 5; [5, 15) would split [14, 23): stop at 14;
    # then [14, 23) and the rest.
    assert _chunks(scheduler, "r", 4) == [5, 9, 10, 6]


def test_an_item_longer_than_a_step_is_split_anyway():
    scheduler = _scheduler(max_num_batched_tokens=8)
    scheduler.add_request(_request("r", 20, [(2, 12)], unchunked=True))
    assert _chunks(scheduler, "r", 3) == [8, 8, 4]


def test_chunked_items_split_freely_within_the_encoder_budget():
    scheduler = _scheduler(max_num_batched_tokens=10)
    scheduler.add_request(_request("r", 30, [(5, 8), (14, 9)], unchunked=False))
    # Encoder budget 10: [0, 10) starts item 1 (8 tokens); [10, 20) starts item 2 (9).
    assert _chunks(scheduler, "r", 3) == [10, 10, 10]
    scheduler = _scheduler(max_num_batched_tokens=10)
    scheduler.add_request(_request("r", 30, [(2, 6), (8, 6)], unchunked=False))
    # [0, 10) would start both items (12 encoder tokens > 10): stop before the second.
    assert _chunks(scheduler, "r", 2) == [8, 10]
