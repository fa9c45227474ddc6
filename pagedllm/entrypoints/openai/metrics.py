"""GET /metrics: Prometheus metrics with vLLM's names, under both the `pagedllm:` and the
`vllm:` prefix (so a vLLM dashboard works unchanged). One registry per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pagedllm.engine.stats import IterationStats, SchedulerStats, StatLoggerBase

PREFIXES = ("pagedllm:", "vllm:")
# vLLM's buckets, in seconds.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class PrometheusStatLogger(StatLoggerBase):
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]
        self._running, self._waiting, self._kv_usage, self._preemptions = [], [], [], []
        self._prompt_tokens, self._generation_tokens, self._success = [], [], []
        self._ttft, self._itl, self._e2e = [], [], []
        for prefix in PREFIXES:
            def metric(kind, name, doc, **kwargs):
                return kind(prefix + name, doc, labels + kwargs.pop("extra_labels", []), registry=self.registry, **kwargs)

            self._running.append(metric(Gauge, "num_requests_running", "Requests in the running batch."))
            self._waiting.append(metric(Gauge, "num_requests_waiting", "Requests waiting (or preempted) to run."))
            self._kv_usage.append(metric(Gauge, "kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full)."))
            self._preemptions.append(metric(Counter, "num_preemptions", "Preemptions since start-up."))
            self._prompt_tokens.append(metric(Counter, "prompt_tokens", "Prompt tokens processed."))
            self._generation_tokens.append(metric(Counter, "generation_tokens", "Tokens generated."))
            self._success.append(metric(Counter, "request_success", "Completions finished, by reason.", extra_labels=["finished_reason"]))
            self._ttft.append(metric(Histogram, "time_to_first_token_seconds", "Time to first token.", buckets=_TTFT_BUCKETS))
            self._itl.append(metric(Histogram, "inter_token_latency_seconds", "Time between output tokens.", buckets=_ITL_BUCKETS))
            self._e2e.append(metric(Histogram, "e2e_request_latency_seconds", "Arrival to last token.", buckets=_E2E_BUCKETS))
        self.model_name = model_name
        self._num_preemptions = 0
        # Every series exists (at 0) from start-up, before the first request.
        for family in (self._running, self._waiting, self._kv_usage, self._preemptions, self._prompt_tokens,
                       self._generation_tokens, self._ttft, self._itl, self._e2e):
            for metric in family:
                metric.labels(model_name)

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats) -> None:
        name = self.model_name
        if scheduler_stats is not None:
            new_preemptions = scheduler_stats.num_preemptions - self._num_preemptions
            self._num_preemptions = scheduler_stats.num_preemptions
            for gauge in self._running:
                gauge.labels(name).set(scheduler_stats.num_running_reqs)
            for gauge in self._waiting:
                gauge.labels(name).set(scheduler_stats.num_waiting_reqs)
            for gauge in self._kv_usage:
                gauge.labels(name).set(scheduler_stats.kv_cache_usage)
            if new_preemptions > 0:
                for counter in self._preemptions:
                    counter.labels(name).inc(new_preemptions)
        for counter in self._prompt_tokens:
            counter.labels(name).inc(iteration_stats.num_prompt_tokens)
        for counter in self._generation_tokens:
            counter.labels(name).inc(iteration_stats.num_generation_tokens)
        for histograms, values in ((self._ttft, iteration_stats.time_to_first_tokens), (self._itl, iteration_stats.inter_token_latencies)):
            for histogram in histograms:
                child = histogram.labels(name)
                for value in values:
                    child.observe(value)
        for reason, seconds in iteration_stats.finished_requests:
            for counter in self._success:
                counter.labels(name, reason).inc()
            for histogram in self._e2e:
                histogram.labels(name).observe(seconds)
