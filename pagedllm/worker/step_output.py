"""A step's sampled token ids on their way to the host.

The ids stay on the device (`device_sampled`), where the next step's inputs read them at the
rows the InputBatch recorded, and are copied to pinned host memory without waiting; a CUDA
event marks when that copy is done. The host reads them one step later (async scheduling) or
at once (`async_scheduling=False`), and only then writes them over the placeholders in the
persistent batch's token rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.engine.scheduler_output import ModelRunnerOutput, TokenLogprobs
from pagedllm.layers.sampler import LogprobsTensors, to_token_logprobs
from pagedllm.worker.input_batch import InputBatch


@dataclass(slots=True)
class InFlightStep:
    output: ModelRunnerOutput
    """Everything but the sampled ids (and their logprobs), filled when resolved."""
    batch: InputBatch | None = None
    req_ids: list[str] = field(default_factory=list)
    """The requests that sampled, in sampled-row order."""
    epochs: np.ndarray | None = None
    token_indices: np.ndarray | None = None
    """Where each request's placeholder sits in its token row."""
    num_logprobs: list[int | None] = field(default_factory=list)
    device_sampled: torch.Tensor | None = None
    host_sampled: torch.Tensor | None = None
    host_logprobs: LogprobsTensors | None = None
    copy_done: torch.cuda.Event | None = None
    resolved: bool = False

    @classmethod
    def start(
        cls,
        output: ModelRunnerOutput,
        batch: InputBatch,
        rows: np.ndarray,
        sampled: torch.Tensor,
        logprobs: LogprobsTensors | None,
    ) -> InFlightStep:
        """Appends a placeholder to each sampled row's tokens and starts the copies to the host."""
        step = cls(
            output=output,
            batch=batch,
            req_ids=[batch.req_ids[row] for row in rows.tolist()],
            epochs=batch.epoch[rows],
            token_indices=batch.append_placeholders(rows),
            device_sampled=sampled,
        )
        if logprobs is not None:
            step.num_logprobs = [batch.sampling_params[row].logprobs for row in rows.tolist()]
        if sampled.device.type == "cuda":
            step.host_sampled = _to_pinned(sampled)
            if logprobs is not None:
                step.host_logprobs = LogprobsTensors(
                    _to_pinned(logprobs.token_ids), _to_pinned(logprobs.logprobs), _to_pinned(logprobs.ranks)
                )
            step.copy_done = torch.cuda.Event()
            step.copy_done.record()
        else:
            step.host_sampled = sampled
            step.host_logprobs = logprobs
        return step

    def resolve(self) -> ModelRunnerOutput:
        """Waits for the copy (not for later steps), fills the placeholders and the output."""
        if self.resolved:
            return self.output
        self.resolved = True
        if self.copy_done is not None:
            self.copy_done.synchronize()
        if not self.req_ids:
            return self.output
        assert self.host_sampled is not None and self.batch is not None
        sampled = self.host_sampled.tolist()
        # A request dropped since (finished, preempted) is skipped; one re-added under the
        # same id has a new epoch.
        self.batch.fill_placeholders(self.req_ids, self.epochs, self.token_indices, sampled)
        output = self.output
        for req_id, token_id in zip(self.req_ids, sampled):
            output.sampled_token_ids[req_id] = [token_id]
        if self.host_logprobs is not None:
            per_row = to_token_logprobs(self.host_logprobs)
            for row, (req_id, num_logprobs) in enumerate(zip(self.req_ids, self.num_logprobs)):
                if num_logprobs is not None:
                    output.logprobs[req_id] = _row_logprobs(per_row, row, num_logprobs)
        return output


def _to_pinned(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def _row_logprobs(per_row: TokenLogprobs, row: int, num_logprobs: int) -> TokenLogprobs:
    """One request's slice of a batched TokenLogprobs, trimmed to the top-k it asked for
    (the chosen token first)."""
    keep = None if num_logprobs == -1 else num_logprobs + 1
    return TokenLogprobs(
        token_ids=[per_row.token_ids[row][:keep]],
        logprobs=[per_row.logprobs[row][:keep]],
        ranks=[per_row.ranks[row]],
    )
