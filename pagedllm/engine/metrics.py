"""Engine statistics for `LLM.get_metrics()`, as vLLM's metric objects (vllm.v1.metrics.reader:
Counter, Gauge, Histogram, Vector) with vLLM's metric names, so code reading them works."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.engine.outputs import RequestOutput
from pagedllm.engine.stats import IterationStats

if TYPE_CHECKING:
    from pagedllm.engine.scheduler import Scheduler

# Seconds; vLLM's buckets for request latencies.
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


@dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    value: int


@dataclass
class Gauge(Metric):
    value: float


@dataclass
class Vector(Metric):
    values: list[int]


@dataclass
class Histogram(Metric):
    count: int
    sum: float
    buckets: dict[str, int]
    """Upper bound ("+Inf" last) -> cumulative count of observations at or below it."""


def _one_two_five_buckets(largest: int) -> tuple[int, ...]:
    """vLLM's buckets for counts: 1, 2, 5, 10, 20, 50, ... up to `largest`."""
    bounds, scale = [], 1
    while True:
        for step in (1, 2, 5):
            if step * scale > largest:
                return tuple(bounds)
            bounds.append(step * scale)
        scale *= 10


@dataclass
class _Histogram:
    bounds: tuple[float, ...] = _LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float | None) -> None:
        if value is None:
            return
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def to_metric(self, name: str) -> Histogram:
        cumulative, running = {}, 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts):
            running += count
            cumulative[bound] = running
        return Histogram(name=name, labels={}, count=running, sum=self.total, buckets=cumulative)


class EngineStats:
    """Counts since start-up, updated from each step's outputs and from finished requests."""

    def __init__(self, max_model_len: int) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished_by_reason: dict[str, int] = {}
        self.time_to_first_token = _Histogram()
        self.e2e_latency = _Histogram()
        self.queue_time = _Histogram()
        self.prefill_time = _Histogram()
        self.decode_time = _Histogram()
        self.inference_time = _Histogram()
        self.inter_token_latency = _Histogram()
        token_buckets = _one_two_five_buckets(max_model_len)
        self.request_prompt_tokens = _Histogram(token_buckets)
        self.request_generation_tokens = _Histogram(token_buckets)
        self.request_max_tokens = _Histogram(token_buckets)
        self.request_n = _Histogram((1, 2, 5, 10, 20))
        self._params: dict[str, tuple[int, int | None]] = {}
        """Per running request id: its n and max_tokens."""

    def record_added(self, request_id: str, n: int, max_tokens: int | None) -> None:
        self._params[request_id] = (n, max_tokens)

    def record_step(self, iteration: IterationStats) -> None:
        """A step's inter-token latencies (engine/stats.CompletionClock measures them)."""
        for latency in iteration.inter_token_latencies:
            self.inter_token_latency.observe(latency)

    def forget(self, request_id: str) -> None:
        """An aborted request."""
        self._params.pop(request_id, None)

    def record_finished(self, output: RequestOutput) -> None:
        self.prompt_tokens += len(output.prompt_token_ids)
        for completion in output.outputs:
            reason = completion.finish_reason or "abort"
            self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        metrics = output.metrics
        # The metrics count every token, also those of earlier DELTA outputs.
        generated = metrics.num_generation_tokens if metrics is not None else sum(
            len(c.token_ids) for c in output.outputs)
        self.generation_tokens += generated
        self.request_prompt_tokens.observe(len(output.prompt_token_ids))
        self.request_generation_tokens.observe(generated)
        n, max_tokens = self._params.pop(output.request_id, (len(output.outputs), None))
        self.request_n.observe(n)
        self.request_max_tokens.observe(max_tokens)
        if metrics is not None:
            self.time_to_first_token.observe(metrics.first_token_latency)
            self.e2e_latency.observe(metrics.e2e_latency)
            self.queue_time.observe(metrics.time_in_queue)
            self.prefill_time.observe(metrics.prefill_time)
            self.decode_time.observe(metrics.decode_time)
            if metrics.finished_time is not None and metrics.first_scheduled_time is not None:
                self.inference_time.observe(metrics.finished_time - metrics.first_scheduled_time)

    def snapshot(self, scheduler: Scheduler) -> list[Metric]:
        kv = scheduler.kv_cache_manager
        running = len(scheduler.running)
        metrics: list[Metric] = [
            Gauge("vllm:num_requests_running", {}, float(running)),
            Gauge("vllm:num_requests_waiting", {}, float(scheduler.get_num_unfinished_requests() - running)),
            Gauge("vllm:kv_cache_usage_perc", {}, kv.usage),
            Counter("vllm:num_preemptions", {}, scheduler.num_preemptions),
            Counter("vllm:prefix_cache_queries", {}, kv.prefix_cache_stats.num_query_tokens),
            Counter("vllm:prefix_cache_hits", {}, kv.prefix_cache_stats.num_hit_tokens),
            Counter("vllm:prompt_tokens", {}, self.prompt_tokens),
            Counter("vllm:generation_tokens", {}, self.generation_tokens),
        ]
        for reason in ("stop", "length", "abort", "error"):
            metrics.append(Counter("vllm:request_success", {"finished_reason": reason}, self.finished_by_reason.get(reason, 0)))
        metrics += [
            self.time_to_first_token.to_metric("vllm:time_to_first_token_seconds"),
            self.e2e_latency.to_metric("vllm:e2e_request_latency_seconds"),
            self.queue_time.to_metric("vllm:request_queue_time_seconds"),
            self.prefill_time.to_metric("vllm:request_prefill_time_seconds"),
            self.decode_time.to_metric("vllm:request_decode_time_seconds"),
            self.inference_time.to_metric("vllm:request_inference_time_seconds"),
            self.inter_token_latency.to_metric("vllm:inter_token_latency_seconds"),
            self.request_prompt_tokens.to_metric("vllm:request_prompt_tokens"),
            self.request_generation_tokens.to_metric("vllm:request_generation_tokens"),
            self.request_n.to_metric("vllm:request_params_n"),
            self.request_max_tokens.to_metric("vllm:request_params_max_tokens"),
        ]
        return metrics
