"""The worker's copy of each running request, and the step's input tensors built from it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.scheduler_output import SchedulerOutput
from pagedllm.forward_context import AttentionMetadata


PLACEHOLDER_TOKEN_ID = -1
"""Stands in a worker's token list for a sampled id the host does not know yet (async
scheduling); the step that reads it as an input takes the id from the device instead."""


@dataclass(slots=True)
class CachedRequestState:
    req_id: str
    token_ids: list[int]
    """Prompt, then every output token: the worker appends what it samples."""
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    generator: torch.Generator | None
    """Set for requests with their own seed."""
    num_computed_tokens: int


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    req_ids: list[str]
    query_starts: list[int]
    """Row of each request's first token in the flat batch."""
    query_lens: list[int]
    start_positions: list[int]
    """Position of each request's first token this step (= its computed tokens before it)."""


class HostStager:
    """Copies a step's packed int64 inputs to the device through one pinned buffer that is
    reused across steps (allocating pinned memory per step costs more than the copy)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: torch.Tensor | None = None
        self._copy_done: torch.cuda.Event | None = None

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(array)
        if self.device.type != "cuda":
            return host
        if self._pinned is None or self._pinned.numel() < host.numel():
            self._pinned = torch.empty(max(host.numel(), 1 << 16), dtype=torch.int64, pin_memory=True)
        elif self._copy_done is not None:
            # The previous step's copy must have left the buffer before it is overwritten.
            self._copy_done.synchronize()
        staging = self._pinned[: host.numel()]
        staging.copy_(host)
        result = staging.to(self.device, non_blocking=True)
        self._copy_done = torch.cuda.Event()
        self._copy_done.record()
        return result


def build_step_inputs(
    scheduler_output: SchedulerOutput,
    requests: dict[str, CachedRequestState],
    block_size: int,
    stager: HostStager,
    previous_sampled: tuple[dict[str, int], torch.Tensor] | None = None,
) -> StepInputs:
    """Flattens the scheduled tokens of every request into one batch. Per-request work is a
    list slice; per-token values (positions, slots) are computed with array ops.

    `previous_sampled` is the last step's (request id -> row, device ids): a token still
    unknown to the host (a placeholder) is taken from there, on the device."""
    req_ids = list(scheduler_output.num_scheduled_tokens)
    query_lens = [scheduler_output.num_scheduled_tokens[r] for r in req_ids]
    starts = [requests[r].num_computed_tokens for r in req_ids]
    token_ids: list[int] = []
    for req_id, start, length in zip(req_ids, starts, query_lens):
        state = requests[req_id]
        assert start + length <= len(state.token_ids), (req_id, start, length, len(state.token_ids))
        token_ids.extend(state.token_ids[start : start + length])
    num_tokens = len(token_ids)

    query_lens_np = np.asarray(query_lens, dtype=np.int64)
    starts_np = np.asarray(starts, dtype=np.int64)
    query_start_loc = np.zeros(len(req_ids) + 1, dtype=np.int64)
    np.cumsum(query_lens_np, out=query_start_loc[1:])
    request_index = np.repeat(np.arange(len(req_ids)), query_lens_np)
    positions = np.repeat(starts_np - query_start_loc[:-1], query_lens_np) + np.arange(num_tokens)
    seq_lens = starts_np + query_lens_np

    max_blocks = max((len(requests[r].block_ids) for r in req_ids), default=1) or 1
    block_table = np.zeros((len(req_ids), max_blocks), dtype=np.int32)
    for row, req_id in enumerate(req_ids):
        blocks = requests[req_id].block_ids
        block_table[row, : len(blocks)] = blocks
    block_of_token = block_table[request_index, positions // block_size].astype(np.int64)
    slot_mapping = block_of_token * block_size + positions % block_size
    input_ids = np.asarray(token_ids, dtype=np.int64)
    # Only a request's last token can be a placeholder (the one its previous step sampled).
    fill_rows = np.flatnonzero(input_ids == PLACEHOLDER_TOKEN_ID)
    if len(fill_rows):
        assert previous_sampled is not None, "a placeholder token with no step in flight"
        source_rows = np.asarray([previous_sampled[0][req_ids[i]] for i in request_index[fill_rows]], dtype=np.int64)
    else:
        source_rows = fill_rows

    # One host-to-device copy for every per-step array, split into views on the device.
    parts = [input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_table.ravel(), fill_rows, source_rows]
    packed = stager.to_device(np.concatenate(parts).astype(np.int64, copy=False))
    (dev_input_ids, dev_positions, dev_slots, dev_query_start_loc, dev_seq_lens, dev_block_table,
     dev_fill_rows, dev_source_rows) = torch.split(packed, [len(part) for part in parts])
    if len(fill_rows):
        assert previous_sampled is not None
        dev_input_ids.index_copy_(0, dev_fill_rows, previous_sampled[1].index_select(0, dev_source_rows))
    attn_metadata = AttentionMetadata(
        num_actual_tokens=num_tokens,
        num_reqs=len(req_ids),
        max_query_len=max(query_lens, default=0),
        max_seq_len=int(seq_lens.max()) if len(req_ids) else 0,
        query_start_loc=dev_query_start_loc.to(torch.int32),
        seq_lens=dev_seq_lens.to(torch.int32),
        block_table=dev_block_table.view(block_table.shape).to(torch.int32),
        slot_mapping=dev_slots,
        query_start_loc_cpu=query_start_loc.tolist(),
        seq_lens_cpu=seq_lens.tolist(),
    )
    return StepInputs(
        input_ids=dev_input_ids,
        positions=dev_positions,
        attn_metadata=attn_metadata,
        req_ids=req_ids,
        query_starts=query_start_loc[:-1].tolist(),
        query_lens=query_lens,
        start_positions=starts,
    )


def build_profile_inputs(num_tokens: int, max_model_len: int, device: torch.device) -> StepInputs:
    """A batch of num_tokens dummy tokens in sequences of at most max_model_len, with no KV
    cache: the largest step the scheduler can send, for peak-memory profiling."""
    query_lens = []
    remaining = num_tokens
    while remaining > 0:
        query_lens.append(min(remaining, max_model_len))
        remaining -= query_lens[-1]
    query_start_loc = np.zeros(len(query_lens) + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    positions = np.concatenate([np.arange(length) for length in query_lens])
    attn_metadata = AttentionMetadata(
        num_actual_tokens=num_tokens,
        num_reqs=len(query_lens),
        max_query_len=max(query_lens),
        max_seq_len=max(query_lens),
        query_start_loc=torch.from_numpy(query_start_loc.astype(np.int32)).to(device),
        seq_lens=torch.tensor(query_lens, dtype=torch.int32, device=device),
        block_table=torch.zeros((len(query_lens), 1), dtype=torch.int32, device=device),
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        query_start_loc_cpu=query_start_loc.tolist(),
        seq_lens_cpu=list(query_lens),
    )
    return StepInputs(
        input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=device),
        positions=torch.from_numpy(positions).to(device),
        attn_metadata=attn_metadata,
        req_ids=[],
        query_starts=query_start_loc[:-1].tolist(),
        query_lens=query_lens,
        start_positions=[0] * len(query_lens),
    )
