"""The executors' shared failure policy, driven by a fake transport: answers come back in rank
order; a worker's error is re-raised with its traceback as the cause; ranks that do not answer
within the grace after an error are stopped and the executor refuses later calls; a dead rank
ends the wait at once, even when another rank raised first."""

from __future__ import annotations

import pytest

from pagedllm.executor import base
from pagedllm.executor.base import Executor, RankEvent, RemoteTraceback, WorkerDiedError


class FakeExecutor(Executor):
    """Each call replays scripted events: a list per wait, [] meaning the timeout passed."""

    def __init__(self, script: list[list[RankEvent]]) -> None:
        super().__init__(engine_config=None)  # type: ignore[arg-type]
        self.script = script
        self.stopped = False
        self.timeouts: list[float | None] = []

    def collective_rpc(self, method, args=(), kwargs=None):
        self._check_usable()
        return self._wait_with_grace(2, method, self._wait)

    def _wait(self, pending, timeout):
        self.timeouts.append(timeout)
        return self.script.pop(0) if self.script else []

    def _stop_workers_now(self) -> None:
        self.stopped = True


def test_results_come_back_in_rank_order():
    executor = FakeExecutor([[RankEvent(1, "ok", "b")], [RankEvent(0, "ok", "a")]])
    assert executor.collective_rpc("m") == ["a", "b"]
    assert executor.timeouts == [None, None] and not executor.stopped


def test_an_error_is_reraised_and_every_rank_answering_keeps_the_executor_usable():
    executor = FakeExecutor([[RankEvent(1, "error", ValueError("bad"), "Traceback: in worker")],
                             [RankEvent(0, "ok", 1)]])
    with pytest.raises(ValueError, match="bad") as info:
        executor.collective_rpc("m")
    assert isinstance(info.value.__cause__, RemoteTraceback) and "in worker" in str(info.value.__cause__)
    assert executor.timeouts[1] is not None and executor.timeouts[1] <= base.FAILURE_GRACE_S
    assert not executor.stopped
    executor.script = [[RankEvent(0, "ok", 1), RankEvent(1, "ok", 2)]]
    assert executor.collective_rpc("m") == [1, 2]


def test_ranks_stuck_after_an_error_are_stopped_and_later_calls_refused():
    executor = FakeExecutor([[RankEvent(0, "error", RuntimeError("boom"), "tb")], []])
    with pytest.raises(RuntimeError, match="boom") as info:
        executor.collective_rpc("execute_model")
    assert executor.stopped
    assert any("[1] did not finish execute_model" in note for note in getattr(info.value, "__notes__", []))
    with pytest.raises(RuntimeError, match="stopped after an earlier failure"):
        executor.collective_rpc("m")


def test_a_dead_rank_wins_over_an_earlier_error():
    executor = FakeExecutor([[RankEvent(0, "error", RuntimeError("collective failed"), "tb")],
                             [RankEvent(1, "died", "(pid 7) died with signal SIGKILL")]])
    with pytest.raises(WorkerDiedError, match=r"Worker rank 1 \(pid 7\) died with signal SIGKILL during m"):
        executor.collective_rpc("m")
    assert executor.stopped
