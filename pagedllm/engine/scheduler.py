"""Decides, each step, which requests run and how many tokens each computes. No torch.

There are no prefill and decode phases: every request has `num_computed_tokens` and
`num_tokens` (prompt + output so far), and a step gives each running request the tokens it
needs to catch up (a prompt chunk, or the one token sampled last step), within
`max_num_batched_tokens` and `max_num_seqs`, then admits waiting requests FIFO.

Token accounting, precisely. `schedule()` advances each scheduled request's
`num_computed_tokens` by its scheduled count right away (optimistically, as vLLM v1 does),
while the `NewRequestData` / `CachedRequestData` it sends carry the value from BEFORE the
step: the position where this step's tokens start. The tokens computed this step are the
request's token ids [num_computed_tokens, num_computed_tokens + num_scheduled_tokens[id]).
The runner samples a token only for a request whose computed tokens then reach its last
known token (end of the prompt, or the token sampled last step); during a partial prefill
it returns [] for it. `update_from_output()` appends the sampled tokens, which makes
num_tokens - num_computed_tokens == 1 again: next step's decode token.

Workers must apply `finished_req_ids` (drop state) before adding `scheduled_new_reqs`.

With async scheduling, step N+1 is scheduled before step N's sampled tokens are known: a
request that samples in a step gets one `num_output_placeholders`, which counts as a token
to compute in the next step (the workers feed it from the device); `update_from_output()`
turns each placeholder into the real token. A request that may already be done (its budget or
max_model_len reached by its placeholders) is not scheduled again, and the outputs of a step
that was in flight when its request finished, was aborted or was preempted are discarded.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagedllm.engine.kv_cache_manager import KVCacheManager
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    TokenLogprobs,
)
from pagedllm.engine.stats import SchedulerStats

if TYPE_CHECKING:
    # pagedllm.config imports torch; the scheduler only reads plain attributes from these.
    from pagedllm.config import CacheConfig, SchedulerConfig

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None
    """None while running; else "stop", "length", "abort" or "error"."""
    stop_reason: int | str | None
    """The stop token id that ended the request; None for EOS and length."""
    new_logprobs: TokenLogprobs | None
    new_prompt_logprobs: TokenLogprobs | None
    num_cached_tokens: int
    first_scheduled_time: float | None = None
    """Wall-clock time of the first step that ran the request (for RequestOutput.metrics)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(
        self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_kv_blocks: int
    ) -> None:
        self.max_num_seqs: int = scheduler_config.max_num_seqs
        self.max_num_batched_tokens: int = scheduler_config.max_num_batched_tokens
        self.max_model_len: int = scheduler_config.max_model_len
        self.async_scheduling: bool = scheduler_config.async_scheduling
        self.block_size: int = cache_config.block_size
        self.kv_cache_manager = KVCacheManager(
            num_kv_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}
        """Unfinished requests (waiting, preempted or running) by id."""
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        """In admission order: the last one is preempted first."""
        self.finished_req_ids: set[str] = set()
        """Finished since the last schedule(); sent once in the next SchedulerOutput."""
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        # The engine validates prompts against max_model_len; these guard our invariants.
        assert request.request_id not in self.requests, f"duplicate request id {request.request_id!r}"
        assert 0 < request.num_prompt_tokens <= self.max_model_len, (
            request.request_id,
            request.num_prompt_tokens,
            self.max_model_len,
        )
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """End requests from outside (abort, a stop string, an error): frees their blocks and
        reports their ids to the workers in the next step. Unknown or finished ids are ignored."""
        assert status.is_finished, status
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free_request(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_finished_requests(self) -> bool:
        """Finished ids not yet sent to the workers: the engine should still run one
        (possibly empty) schedule() so the workers drop those requests' state."""
        return bool(self.finished_req_ids)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def make_stats(self) -> SchedulerStats:
        """The load right now, for the server's metrics."""
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv_cache_manager.usage,
            num_preemptions=self.num_preemptions,
        )

    def schedule(self) -> SchedulerOutput:
        kv = self.kv_cache_manager
        token_budget = self.max_num_batched_tokens
        num_scheduled_tokens: dict[str, int] = {}
        cached_reqs: list[CachedRequestData] = []
        new_reqs: list[NewRequestData] = []
        finished_req_ids, self.finished_req_ids = self.finished_req_ids, set()
        preempted = False
        # Vision-encoder tokens this step may start (vLLM's encoder compute budget): an item
        # is encoded at the first step that computes one of its tokens. _cap_for_items also
        # keeps unchunked items (Gemma 3's images) in one chunk.
        encoder_budget = self.max_num_batched_tokens

        index = 0
        while index < len(self.running) and token_budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens_with_placeholders - request.num_computed_tokens, token_budget)
            if request.mm_features and num_new > 0:
                num_new, encoder_budget = _cap_for_items(
                    request, request.num_computed_tokens, num_new, encoder_budget, False, self.max_num_batched_tokens
                )
            if num_new <= 0 or self._may_be_done(request):
                # Its last sampled token has not been appended yet, or a step in flight may
                # end it, or its next chunk waits for encoder budget: nothing to compute now.
                index += 1
                continue
            while (new_block_ids := kv.allocate_slots(request, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim)
                finished_req_ids.add(victim.request_id)
                preempted = True
                if victim is request:
                    break
            if new_block_ids is None:
                break
            cached_reqs.append(
                CachedRequestData(request.request_id, new_block_ids, request.num_computed_tokens)
            )
            num_scheduled_tokens[request.request_id] = num_new
            token_budget -= num_new
            index += 1

        # Admitting while preempting would only churn: the blocks just freed are needed by
        # the running requests' next tokens.
        while (
            not preempted and self.waiting and token_budget > 0 and len(self.running) < self.max_num_seqs
        ):
            request = self.waiting[0]
            hit_blocks, num_hit_tokens = kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, token_budget)
            if request.mm_features:
                num_new, encoder_budget = _cap_for_items(
                    request, num_hit_tokens, num_new, encoder_budget, True, self.max_num_batched_tokens
                )
                if num_new <= 0:
                    break
            if kv.allocate_slots(request, num_new, hit_blocks) is None:
                break
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
                request.first_scheduled_time = time.time()
            new_reqs.append(
                NewRequestData(
                    req_id=request.request_id,
                    token_ids=request.all_token_ids,
                    num_prompt_tokens=request.num_prompt_tokens,
                    sampling_params=request.sampling_params,
                    block_ids=kv.get_block_ids(request),
                    num_computed_tokens=num_hit_tokens,
                    eos_token_id=request.eos_token_id,
                    eos_token_ids=request.eos_token_ids,
                    mm_features=request.mm_features,
                    mrope_positions=request.mrope_positions,
                    mrope_position_delta=request.mrope_position_delta,
                )
            )
            num_scheduled_tokens[request.request_id] = num_new
            token_budget -= num_new

        for req_id, num_tokens in num_scheduled_tokens.items():
            request = self.requests[req_id]
            request.num_computed_tokens += num_tokens
            # As in vLLM, the blocks this step fills are shared from now on: a later step that
            # reuses them runs after this one on the workers. So a prompt admitted while the
            # step that computes its prefix is still in flight hits the cache under async
            # scheduling exactly as it does under sync scheduling.
            kv.cache_full_blocks(request, min(request.num_computed_tokens, request.num_tokens))
            if self.async_scheduling and request.num_computed_tokens == request.num_tokens_with_placeholders:
                # It samples this step; its token is known to the host only after the step.
                request.num_output_placeholders += 1
        total = self.max_num_batched_tokens - token_budget
        assert len(num_scheduled_tokens) <= self.max_num_seqs and total >= 0
        return SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled_tokens,
            total_num_scheduled_tokens=total,
            finished_req_ids=finished_req_ids,
        )

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append the sampled tokens, check stop conditions and free finished requests (the
        blocks the step filled were registered for prefix caching when it was scheduled).
        Returns an output for every request that got tokens or prompt logprobs, or finished."""
        outputs: list[EngineCoreOutput] = []
        stopped: set[str] = set()
        chunk_starts = _chunk_starts(scheduler_output) if model_runner_output.prompt_logprobs else {}
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished or preempted since the step was scheduled
            new_token_ids = model_runner_output.sampled_token_ids.get(req_id) or []
            if self.async_scheduling and new_token_ids:
                request.num_output_placeholders -= len(new_token_ids)
                assert request.num_output_placeholders >= 0, (req_id, request.num_output_placeholders)
            status: RequestStatus | None = None
            for num_kept, token_id in enumerate(new_token_ids, start=1):
                request.output_token_ids.append(token_id)
                status = self._check_stop(request, token_id)
                if status is not None:
                    new_token_ids = new_token_ids[:num_kept]
                    break
            prompt_logprobs = model_runner_output.prompt_logprobs.get(req_id)
            if prompt_logprobs is not None:
                prompt_logprobs = _unsent_prompt_rows(request, chunk_starts[req_id], prompt_logprobs)
            if status is not None:
                request.status = status
                stopped.add(req_id)
                self._free_request(request)
            if new_token_ids or prompt_logprobs is not None or status is not None:
                outputs.append(
                    EngineCoreOutput(
                        request_id=req_id,
                        new_token_ids=list(new_token_ids),
                        finish_reason=status.finish_reason if status is not None else None,
                        stop_reason=request.stop_reason,
                        new_logprobs=model_runner_output.logprobs.get(req_id),
                        new_prompt_logprobs=prompt_logprobs,
                        num_cached_tokens=request.num_cached_tokens,
                        first_scheduled_time=request.first_scheduled_time,
                    )
                )
        if stopped:
            self.running = [r for r in self.running if r.request_id not in stopped]
        return outputs

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token_id in (params.stop_token_ids or ()):
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and (token_id == request.eos_token_id or token_id in request.eos_token_ids):
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        return None

    def _may_be_done(self, request: Request) -> bool:
        """A step in flight may already have sampled this request's last token."""
        placeholders = request.num_output_placeholders
        return placeholders > 0 and (
            request.num_output_tokens + placeholders >= request.max_tokens
            or request.num_tokens_with_placeholders >= self.max_model_len
        )

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        # The token of a step in flight is discarded and sampled again after the recompute.
        request.num_output_placeholders = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        logger.warning(
            "Request %s was preempted by recompute (%d preemptions so far); the KV cache is too "
            "small for the current load, consider raising gpu_memory_utilization / "
            "PAGEDLLM_CPU_KVCACHE_SPACE or lowering max_num_seqs.",
            request.request_id,
            self.num_preemptions,
        )

    def _free_request(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self.finished_req_ids.add(request.request_id)


def _chunk_starts(scheduler_output: SchedulerOutput) -> dict[str, int]:
    """Where each request's chunk of the step began (its computed tokens at scheduling)."""
    starts = {new.req_id: new.num_computed_tokens for new in scheduler_output.scheduled_new_reqs}
    starts.update((cached.req_id, cached.num_computed_tokens) for cached in scheduler_output.scheduled_cached_reqs)
    return starts


def _unsent_prompt_rows(request: Request, start: int, rows: TokenLogprobs) -> TokenLogprobs | None:
    """The step's prompt-logprob rows (positions start, start + 1, ...) that were not sent
    before: a request recomputed after a preemption scores its prompt again."""
    sent = request.num_prompt_logprob_rows
    request.num_prompt_logprob_rows = max(sent, start + len(rows.ranks))
    skip = max(0, sent - start)
    if skip >= len(rows.ranks):
        return None
    return rows.rows_from(skip) if skip else rows


def _cap_for_items(
    request: Request, start: int, num_new: int, encoder_budget: int, admitting: bool, full_budget: int
) -> tuple[int, int]:
    """Shortens the chunk [start, start + num_new) for the request's multi-modal items;
    returns (num_new, encoder budget left).

    - An `unchunked` item (bidirectional attention among its tokens, e.g. Gemma 3) is never
      split: the chunk stops before the item's remaining tokens unless they all fit (a
      request may then wait a step for a larger budget); an item longer than
      max_num_batched_tokens is split anyway, or it could never run.
    - Encoder budget: the chunk stops before the first item whose encoding would overrun it.
      Items started in an earlier step are already encoded (the runner keeps their outputs);
      at admission every overlapped item is encoded, including one a prefix hit cut into. An
      item larger than the whole budget may still start a step, so every request progresses.
    """
    end = start + num_new
    used_any = False
    for feature in request.mm_features:
        offset, length = feature.placeholder.offset, feature.placeholder.length
        if offset >= end or offset + length <= start:
            continue
        first = max(offset, start)
        if feature.unchunked and offset + length > end and offset + length - first <= full_budget:
            return first - start, encoder_budget
        if offset < start and not admitting:
            continue
        cost = feature.placeholder.num_embeds
        if cost > encoder_budget and (used_any or encoder_budget < full_budget):
            return max(offset - start, 0), encoder_budget
        encoder_budget -= cost
        used_any = True
    return num_new, max(encoder_budget, 0)
