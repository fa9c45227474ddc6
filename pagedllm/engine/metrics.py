"""Engine statistics for `LLM.get_metrics()`, as vLLM's metric objects (vllm.v1.metrics.reader:
Counter, Gauge, Histogram, Vector) with vLLM's metric names, so code reading them works."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedllm.engine.outputs import RequestOutput

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


@dataclass
class _Histogram:
    bounds: tuple[float, ...] = _LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(_LATENCY_BUCKETS) + 1))
    total: float = 0.0

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


@dataclass
class EngineStats:
    """Counts since start-up, updated from finished RequestOutputs."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished_by_reason: dict[str, int] = field(default_factory=dict)
    time_to_first_token: _Histogram = field(default_factory=_Histogram)
    e2e_latency: _Histogram = field(default_factory=_Histogram)
    queue_time: _Histogram = field(default_factory=_Histogram)
    prefill_time: _Histogram = field(default_factory=_Histogram)

    def record_finished(self, output: RequestOutput) -> None:
        self.prompt_tokens += len(output.prompt_token_ids)
        for completion in output.outputs:
            self.generation_tokens += len(completion.token_ids)
            reason = completion.finish_reason or "abort"
            self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        metrics = output.metrics
        if metrics is not None:
            self.time_to_first_token.observe(metrics.first_token_latency)
            self.e2e_latency.observe(metrics.e2e_latency)
            self.queue_time.observe(metrics.time_in_queue)
            self.prefill_time.observe(metrics.prefill_time)

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
        ]
        return metrics
