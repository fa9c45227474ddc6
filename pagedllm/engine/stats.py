"""Numbers the server exports as metrics. `SchedulerStats` is measured in the engine-core
process and travels with each step's outputs; `IterationStats` is gathered in the front
process, where requests arrive and tokens reach clients. No torch."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


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


class _CompletionTimes:
    __slots__ = ("arrival", "num_prompt_tokens", "last_token")

    def __init__(self, arrival: float, num_prompt_tokens: int) -> None:
        self.arrival = arrival
        self.num_prompt_tokens = num_prompt_tokens
        self.last_token: float | None = None


class CompletionClock:
    """When each running completion (child request) arrived and last got tokens; turns each
    batch of engine-core outputs into its IterationStats. LLMEngine and AsyncLLM both keep one."""

    def __init__(self) -> None:
        self._times: dict[str, _CompletionTimes] = {}

    def start(self, child_ids: Iterable[str], num_prompt_tokens: int) -> None:
        now = time.monotonic()
        for child_id in child_ids:
            self._times[child_id] = _CompletionTimes(now, num_prompt_tokens)

    def measure(self, core_outputs: Iterable[Any]) -> IterationStats:
        stats = IterationStats()
        now = time.monotonic()
        for output in core_outputs:
            times = self._times.get(output.request_id)
            if times is None:
                continue
            if output.new_token_ids:
                stats.num_generation_tokens += len(output.new_token_ids)
                if times.last_token is None:
                    stats.num_prompt_tokens += times.num_prompt_tokens
                    stats.time_to_first_tokens.append(now - times.arrival)
                else:
                    stats.inter_token_latencies.append(now - times.last_token)
                times.last_token = now
            if output.finish_reason is not None:
                stats.finished_requests.append((output.finish_reason, now - times.arrival))
                del self._times[output.request_id]
        return stats

    def finish(self, child_ids: Iterable[str], reason: str, stats: IterationStats) -> None:
        """Completions the front end ended (a stop string, an output error) into `stats`."""
        now = time.monotonic()
        for child_id in child_ids:
            times = self._times.pop(child_id, None)
            if times is not None:
                stats.finished_requests.append((reason, now - times.arrival))

    def forget(self, child_ids: Iterable[str]) -> None:
        for child_id in child_ids:
            self._times.pop(child_id, None)

    def clear(self) -> None:
        self._times.clear()
