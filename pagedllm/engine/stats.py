"""Numbers the server exports as metrics. `SchedulerStats` is measured in the engine-core
process and travels with each step's outputs; `IterationStats` is gathered in the front
process, where requests arrive and tokens reach clients. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    """Waiting and preempted requests."""
    kv_cache_usage: float = 0.0
    """Fraction of KV cache blocks in use, in [0, 1]."""
    num_preemptions: int = 0
    """Cumulative since start-up."""


@dataclass(slots=True)
class IterationStats:
    """What one batch of engine-core outputs did, as seen by the front process."""

    num_prompt_tokens: int = 0
    """Prompt tokens of requests that got their first token in this batch."""
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished_requests: list[tuple[str, float]] = field(default_factory=list)
    """(finish reason, end-to-end seconds) of each completion that finished."""


class StatLoggerBase:
    """Receives the stats of every batch of outputs (vLLM's `StatLoggerBase`)."""

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats) -> None:
        raise NotImplementedError
