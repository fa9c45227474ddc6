"""The worker's copy of the running requests (a persistent batch of per-row arrays), and each
step's input tensors gathered from it."""

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


class InputBatch:
    """The running requests' state in preallocated per-row arrays (vLLM's persistent batch),
    updated from each SchedulerOutput's diffs: rows are added for new requests, removed (the
    last row moved into the hole, so live rows stay 0..num_reqs-1) for finished ones, and
    extended with new blocks and sampled tokens. A step's inputs are then gathers from these
    arrays, whatever the batch size."""

    def __init__(self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int) -> None:
        self.max_num_reqs = max_num_reqs
        self.req_ids: list[str] = []
        """Row -> request id, for rows 0..num_reqs-1."""
        self.row_of: dict[str, int] = {}
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int32)
        """Prompt, then output tokens (PLACEHOLDER_TOKEN_ID until the host knows them)."""
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        self.last_sample_index = np.zeros(max_num_reqs, dtype=np.int64)
        """Row of this request in the last step's sampled ids (where its placeholder is)."""
        self.epoch = np.zeros(max_num_reqs, dtype=np.int64)
        """Which admission of the request id lives in the row: a late write for an earlier
        request with the same id is recognised and dropped."""
        self.sampling_params: list[SamplingParams] = []
        self.generators: list[torch.Generator | None] = []
        """Per row: the request's own generator when it has a seed."""
        self.seeded = np.zeros(max_num_reqs, dtype=bool)
        self.reads_history = np.zeros(max_num_reqs, dtype=bool)
        """The row's sampling reads its earlier token ids (penalties), not just their count."""
        self.min_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.wants_prompt_logprobs = np.zeros(max_num_reqs, dtype=bool)
        self.version = 0
        """Bumped whenever rows are added, removed or moved (keys cached sampling metadata)."""
        self._num_added = 0

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    def add(self, req_id: str, token_ids: list[int], num_prompt_tokens: int, block_ids: list[int],
            num_computed_tokens: int, params: SamplingParams, generator: torch.Generator | None) -> None:
        row = len(self.req_ids)
        assert row < self.max_num_reqs and req_id not in self.row_of, (req_id, row)
        self.req_ids.append(req_id)
        self.row_of[req_id] = row
        self.sampling_params.append(params)
        self.generators.append(generator)
        self.token_ids[row, : len(token_ids)] = token_ids
        self.num_tokens[row] = len(token_ids)
        self.num_prompt_tokens[row] = num_prompt_tokens
        self.num_computed_tokens[row] = num_computed_tokens
        self.num_blocks[row] = 0
        self.append_blocks(row, block_ids)
        self.seeded[row] = generator is not None
        self.reads_history[row] = reads_token_history(params)
        self.min_tokens[row] = params.min_tokens
        self.wants_prompt_logprobs[row] = params.prompt_logprobs is not None
        self._num_added += 1
        self.epoch[row] = self._num_added
        self.version += 1

    def append_blocks(self, row: int, block_ids: list[int]) -> None:
        if block_ids:
            start = int(self.num_blocks[row])
            self.block_table[row, start : start + len(block_ids)] = block_ids
            self.num_blocks[row] = start + len(block_ids)

    def remove(self, req_id: str) -> None:
        row = self.row_of.pop(req_id, None)
        if row is None:
            return
        last = len(self.req_ids) - 1
        if row != last:
            moved = self.req_ids[last]
            self.req_ids[row] = moved
            self.row_of[moved] = row
            self.sampling_params[row] = self.sampling_params[last]
            self.generators[row] = self.generators[last]
            num_tokens = int(self.num_tokens[last])
            self.token_ids[row, :num_tokens] = self.token_ids[last, :num_tokens]
            num_blocks = int(self.num_blocks[last])
            self.block_table[row, :num_blocks] = self.block_table[last, :num_blocks]
            for array in (self.num_tokens, self.num_prompt_tokens, self.num_computed_tokens, self.num_blocks,
                          self.last_sample_index, self.epoch, self.seeded, self.reads_history, self.min_tokens,
                          self.wants_prompt_logprobs):
                array[row] = array[last]
        self.req_ids.pop()
        self.sampling_params.pop()
        self.generators.pop()
        self.version += 1

    def append_placeholders(self, rows: np.ndarray) -> np.ndarray:
        """One placeholder token per row (they sampled); returns where each was put."""
        indices = self.num_tokens[rows].copy()
        self.token_ids[rows, indices] = PLACEHOLDER_TOKEN_ID
        self.num_tokens[rows] = indices + 1
        self.last_sample_index[rows] = np.arange(len(rows))
        return indices

    def fill_placeholders(self, req_ids: list[str], epochs: np.ndarray, indices: np.ndarray, token_ids: list[int]) -> None:
        """Writes sampled ids over their placeholders, for the requests still in the batch."""
        for req_id, epoch, index, token_id in zip(req_ids, epochs.tolist(), indices.tolist(), token_ids):
            row = self.row_of.get(req_id)
            if row is not None and self.epoch[row] == epoch:
                self.token_ids[row, index] = token_id

    def prompt_ids(self, row: int) -> np.ndarray:
        return self.token_ids[row, : self.num_prompt_tokens[row]]

    def output_ids(self, row: int) -> np.ndarray:
        return self.token_ids[row, self.num_prompt_tokens[row] : self.num_tokens[row]]


def reads_token_history(params: SamplingParams) -> bool:
    """Whether sampling a row reads the ids of its earlier tokens (not just their count)."""
    penalized = params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    return penalized or bool(params.logits_processors) or bool(params.bad_words_token_ids)


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    req_ids: list[str]
    rows: np.ndarray
    """Each scheduled request's row in the InputBatch, in batch order."""
    query_starts: np.ndarray
    """Row of each request's first token in the flat batch."""
    query_lens: np.ndarray
    start_positions: np.ndarray
    """Position of each request's first token this step (= its computed tokens before it)."""
    samples: np.ndarray
    """Indices (into req_ids) of the requests that sample this step: those whose computed
    tokens reach their last known token (a prompt in chunks samples after its last chunk)."""
    sample_token_rows: torch.Tensor | None
    """On the device: the flat-batch row of each sampling request's last token."""


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
    batch: InputBatch,
    block_size: int,
    stager: HostStager,
    previous_sampled: torch.Tensor | None = None,
) -> StepInputs:
    """Flattens the scheduled tokens of every request into one batch with array gathers from
    the persistent batch and one host-to-device copy. A token still unknown to the host (a
    placeholder: the id the previous step sampled) is taken from `previous_sampled` on the
    device, at the row the InputBatch recorded."""
    num_scheduled = scheduler_output.num_scheduled_tokens
    req_ids = list(num_scheduled)
    num_reqs = len(req_ids)
    row_of = batch.row_of
    rows = np.fromiter((row_of[r] for r in req_ids), dtype=np.int64, count=num_reqs)
    query_lens = np.fromiter(num_scheduled.values(), dtype=np.int64, count=num_reqs)
    starts = batch.num_computed_tokens[rows]
    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    request_index = np.repeat(np.arange(num_reqs), query_lens)
    positions = np.repeat(starts - query_start_loc[:-1], query_lens) + np.arange(num_tokens)
    seq_lens = starts + query_lens
    assert (seq_lens <= batch.num_tokens[rows]).all(), "scheduled past a request's known tokens"
    token_rows = rows[request_index]
    input_ids = batch.token_ids[token_rows, positions].astype(np.int64)

    max_blocks = max(int(batch.num_blocks[rows].max(initial=1)), 1)
    block_table = batch.block_table[rows, :max_blocks]
    block_of_token = block_table[request_index, positions // block_size].astype(np.int64)
    slot_mapping = block_of_token * block_size + positions % block_size

    fill_rows = np.flatnonzero(input_ids == PLACEHOLDER_TOKEN_ID)
    source_rows = batch.last_sample_index[token_rows[fill_rows]]
    samples = np.flatnonzero(seq_lens == batch.num_tokens[rows])
    sample_token_rows = query_start_loc[1:][samples] - 1
    # One host-to-device copy for every per-step array, split into views on the device; the
    # attention metadata's int32 arrays travel as int32, so no cast runs on the device.
    (dev_input_ids, dev_positions, dev_slots, dev_fill_rows, dev_source_rows, dev_sample_token_rows,
     dev_query_start_loc, dev_seq_lens, dev_block_table) = _pack_to_device(
        [input_ids, positions, slot_mapping, fill_rows, source_rows, sample_token_rows],
        [query_start_loc, seq_lens, block_table.ravel()], stager)
    if len(fill_rows):
        assert previous_sampled is not None, "a placeholder token with no step in flight"
        sampled = previous_sampled.index_select(0, dev_source_rows)
        if len(fill_rows) == num_tokens:
            # Every token is one the last step sampled (decode rows only): they are the ids.
            dev_input_ids = sampled
        else:
            dev_input_ids.index_copy_(0, dev_fill_rows, sampled)
    attn_metadata = AttentionMetadata(
        num_actual_tokens=num_tokens,
        num_reqs=num_reqs,
        max_query_len=int(query_lens.max(initial=0)),
        max_seq_len=int(seq_lens.max(initial=0)),
        query_start_loc=dev_query_start_loc,
        seq_lens=dev_seq_lens,
        block_table=dev_block_table.view(block_table.shape),
        slot_mapping=dev_slots,
        query_start_loc_cpu=query_start_loc.tolist(),
        seq_lens_cpu=seq_lens.tolist(),
    )
    return StepInputs(
        input_ids=dev_input_ids,
        positions=dev_positions,
        attn_metadata=attn_metadata,
        req_ids=req_ids,
        rows=rows,
        query_starts=query_start_loc[:-1],
        query_lens=query_lens,
        start_positions=starts,
        samples=samples,
        sample_token_rows=dev_sample_token_rows,
    )


def _pack_to_device(int64_parts: list[np.ndarray], int32_parts: list[np.ndarray],
                    stager: HostStager) -> list[torch.Tensor]:
    """The parts as views of one int64 buffer copied to the device at once: int64_parts as
    int64, then int32_parts as int32 (values that fit). Each view starts on a 16-byte
    boundary: Triton specializes kernels on pointer alignment, so a view at an odd int64
    offset (after an odd token count) would compile a second variant of each kernel that reads
    it, in the middle of a user's request."""
    # Sizes in int64 words, each rounded up to two words (16 bytes).
    words = [len(part) for part in int64_parts] + [-(-len(part) // 2) for part in int32_parts]
    starts = np.zeros(len(words) + 1, dtype=np.int64)
    np.cumsum([count + (count & 1) for count in words], out=starts[1:])
    packed = np.zeros(int(starts[-1]), dtype=np.int64)
    as_int32 = packed.view(np.int32)
    for part, start in zip(int64_parts, starts):
        packed[start : start + len(part)] = part
    for part, start in zip(int32_parts, starts[len(int64_parts):]):
        as_int32[2 * start : 2 * start + len(part)] = part
    device_packed = stager.to_device(packed)
    views = [device_packed[start : start + len(part)] for part, start in zip(int64_parts, starts)]
    for part, start, count in zip(int32_parts, starts[len(int64_parts):], words[len(int64_parts):]):
        views.append(device_packed[start : start + count].view(torch.int32)[: len(part)])
    return views


def build_profile_inputs(num_tokens: int, max_model_len: int, device: torch.device) -> StepInputs:
    """A batch of num_tokens dummy tokens in sequences of at most max_model_len, with no KV
    cache: the largest step the scheduler can send, for peak-memory profiling."""
    query_lens = []
    remaining = num_tokens
    while remaining > 0:
        query_lens.append(min(remaining, max_model_len))
        remaining -= query_lens[-1]
    return build_dummy_inputs(query_lens, block_table_width=1, device=device)


def build_dummy_inputs(query_lens: list[int], block_table_width: int, device: torch.device) -> StepInputs:
    """Token 0 at positions 0.. in a fresh sequence per query length (1: a decode row),
    every block table row pointing at block 0 and no slot written: a step of these shapes
    whose outputs are thrown away (profiling, start-up compilation)."""
    num_tokens = sum(query_lens)
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
        block_table=torch.zeros((len(query_lens), block_table_width), dtype=torch.int32, device=device),
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        query_start_loc_cpu=query_start_loc.tolist(),
        seq_lens_cpu=list(query_lens),
    )
    return StepInputs(
        input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=device),
        positions=torch.from_numpy(positions).to(device),
        attn_metadata=attn_metadata,
        req_ids=[],
        rows=np.zeros(0, dtype=np.int64),
        query_starts=query_start_loc[:-1],
        query_lens=np.asarray(query_lens, dtype=np.int64),
        start_positions=np.zeros(len(query_lens), dtype=np.int64),
        samples=np.zeros(0, dtype=np.int64),
        sample_token_rows=None,
    )
