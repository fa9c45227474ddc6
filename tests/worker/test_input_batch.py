"""The persistent batch: rows added, removed (the last row moved into the hole) and extended
keep every request's tokens and block table; a step's inputs gathered from the arrays equal a
per-request reference; placeholders are filled from the previous step's device ids, and a
late fill for a request re-added under the same id is dropped."""

from __future__ import annotations

import numpy as np
import torch

from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.scheduler_output import SchedulerOutput
from pagedllm.worker.input_batch import PLACEHOLDER_TOKEN_ID, HostStager, InputBatch, build_step_inputs

BLOCK_SIZE = 4


def _step(num_scheduled: dict[str, int]) -> SchedulerOutput:
    return SchedulerOutput([], [], num_scheduled, sum(num_scheduled.values()))


def _reference(batch: InputBatch, num_scheduled: dict[str, int]) -> tuple[list[int], list[int], list[int]]:
    """Input ids, positions and slots, one request at a time."""
    ids, positions, slots = [], [], []
    for req_id, count in num_scheduled.items():
        row = batch.row_of[req_id]
        start = int(batch.num_computed_tokens[row])
        for position in range(start, start + count):
            ids.append(int(batch.token_ids[row, position]))
            positions.append(position)
            slots.append(int(batch.block_table[row, position // BLOCK_SIZE]) * BLOCK_SIZE + position % BLOCK_SIZE)
    return ids, positions, slots


def test_rows_survive_removal_and_inputs_equal_the_per_request_reference():
    batch = InputBatch(max_num_reqs=4, max_model_len=32, max_blocks_per_req=8)
    params = SamplingParams()
    batch.add("a", list(range(10, 19)), 9, [3, 1, 7], 0, params, None)
    batch.add("b", [5, 6], 2, [2], 0, params, None)
    batch.add("c", list(range(40, 46)), 6, [4, 5], 4, params, None)
    batch.remove("a")  # "c" moves into row 0
    assert batch.req_ids == ["c", "b"] and batch.row_of == {"c": 0, "b": 1}
    assert batch.token_ids[0, :6].tolist() == list(range(40, 46)) and batch.num_blocks[0] == 2
    batch.append_blocks(batch.row_of["b"], [9])
    batch.add("d", list(range(70, 83)), 13, [6, 8, 10, 11], 8, params, None)
    scheduled = {"d": 5, "b": 2, "c": 2}
    expected = _reference(batch, scheduled)
    inputs = build_step_inputs(_step(scheduled), batch, BLOCK_SIZE, HostStager(torch.device("cpu")))
    assert (inputs.input_ids.tolist(), inputs.positions.tolist(), inputs.attn_metadata.slot_mapping.tolist()) == expected
    assert inputs.attn_metadata.seq_lens.tolist() == [13, 2, 6]
    assert inputs.attn_metadata.block_table.tolist()[0] == [6, 8, 10, 11]
    assert inputs.attn_metadata.query_start_loc.tolist() == [0, 5, 7, 9]
    # The attention's int32 arrays arrive as int32 views of the one copy (no cast launched),
    # each on a 16-byte boundary like the int64 ones.
    metadata = inputs.attn_metadata
    for tensor in (metadata.query_start_loc, metadata.seq_lens, metadata.block_table):
        assert tensor.dtype == torch.int32 and tensor.is_contiguous() and tensor.data_ptr() % 16 == 0
    for tensor in (inputs.input_ids, inputs.positions, metadata.slot_mapping):
        assert tensor.dtype == torch.int64 and tensor.data_ptr() % 16 == 0


def test_placeholders_come_from_the_previous_steps_device_ids():
    batch = InputBatch(max_num_reqs=4, max_model_len=16, max_blocks_per_req=4)
    params = SamplingParams()
    for req_id, tokens in (("x", [1, 2, 3]), ("y", [4, 5])):
        batch.add(req_id, tokens, len(tokens), [batch.num_reqs], len(tokens), params, None)
    # Last step sampled y then x (rows 1, 0): their ids are only on the device.
    indices = batch.append_placeholders(np.array([1, 0]))
    assert indices.tolist() == [2, 3] and batch.token_ids[0, 3] == PLACEHOLDER_TOKEN_ID
    previous = torch.tensor([55, 33])
    inputs = build_step_inputs(_step({"x": 1, "y": 1}), batch, BLOCK_SIZE, HostStager(torch.device("cpu")), previous)
    assert inputs.input_ids.tolist() == [33, 55]
    # With a prefill chunk beside them, the sampled ids go into their rows among known ones.
    batch.add("z", [7, 8, 9], 3, [2], 0, params, None)
    mixed = build_step_inputs(_step({"z": 3, "x": 1, "y": 1}), batch, BLOCK_SIZE, HostStager(torch.device("cpu")),
                              previous)
    assert mixed.input_ids.tolist() == [7, 8, 9, 33, 55]
    batch.remove("z")
    epochs = batch.epoch[[1, 0]].copy()
    batch.remove("x")
    batch.add("x", [9, 9], 2, [3], 2, params, None)  # the same id, admitted again
    batch.fill_placeholders(["y", "x"], epochs, indices, [55, 33])
    assert batch.output_ids(batch.row_of["y"]).tolist() == [55]
    new_x = batch.row_of["x"]
    assert batch.token_ids[new_x, :2].tolist() == [9, 9] and batch.num_tokens[new_x] == 2
    assert batch.token_ids[new_x, 3] != 33


def test_start_up_dummy_steps_leave_no_state_and_tokens_unchanged(tiny_checkpoints):
    """The warm-up steps (run on CUDA at start-up) drop their requests and leave garbage only
    in KV blocks that real requests overwrite: greedy tokens still equal transformers'."""
    from tiny_models import hf_greedy

    from pagedllm import LLM, SamplingParams

    path = tiny_checkpoints["qwen2"]
    prompts = [list(range(30, 60)), [5, 6, 7]]
    expected = hf_greedy(path, prompts, 6)
    for async_scheduling in (False, True):
        llm = LLM(str(path), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 22,
                  async_scheduling=async_scheduling, enable_prefix_caching=False)
        runner = llm.llm_engine.executor.worker.model_runner
        runner.run_dummy_steps()
        assert runner.input_batch.num_reqs == 0 and runner._in_flight is None
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected
