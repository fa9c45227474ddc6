"""Merging the split-K decode kernel's partial softmax results (Triton).

Each split of a decode row leaves an unnormalised partial output and its log2-domain running
max and softmax denominator (decode_attention.py). merge_splits is called by the last split to
finish, inside the decode kernel; decode_merge_kernel is the separate launch used when no
arrival counters are given.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pagedllm.layers.ops.pdl import start_after_previous_kernel

# Partial rows (head_size float32 values each) a merge loads at once: [rows, GROUP, head_size].
_PARTIAL_ROWS_IN_FLIGHT = 32


def merge_group(rows: int) -> int:
    """GROUP for merge_splits merging `rows` rows at once: 32 partial rows in flight."""
    return max(1, _PARTIAL_ROWS_IN_FLIGHT // rows)


@triton.jit
def decode_query(query_start_loc_ptr, req, num_tokens):
    """Where request req's query starts in the step's tokens, and whether the decode kernels
    skip it: it is not a decode row (one query token) or lies past num_tokens."""
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    return q_start, (q_len != 1) | (q_start >= num_tokens)


@triton.jit
def merge_splits(out_ptrs, part_out_ptr, part_max_ptr, part_sum_ptr, first_row, num_splits, head_size, dims,
                 dim_valid, row_valid, GROUP: tl.constexpr):
    """out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s, over the
    splits [first_row, first_row + num_splits) of each row (a [ROWS] tensor of part rows).
    One online pass, GROUP splits a step: their loads are independent, so the merge waits for
    memory once per GROUP splits rather than twice per split. Loads bypass L1 (.cg): the
    partials were written by other programs."""
    m_run = tl.full(row_valid.shape, float("-inf"), dtype=tl.float32)
    l_run = tl.zeros(row_valid.shape, dtype=tl.float32)
    acc = tl.zeros([row_valid.shape[0], dims.shape[0]], dtype=tl.float32)
    for group_start in range(0, num_splits, GROUP):
        splits = group_start + tl.arange(0, GROUP)
        rows = first_row[:, None] + splits[None, :]
        valid = row_valid[:, None] & (splits < num_splits)[None, :]
        m_s = tl.load(part_max_ptr + rows, mask=valid, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(part_sum_ptr + rows, mask=valid, other=0.0, cache_modifier=".cg")
        part = tl.load(part_out_ptr + rows[:, :, None] * head_size + dims[None, None, :],
                       mask=valid[:, :, None] & dim_valid[None, None, :], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m_s, 1))
        # A row no split has seen yet keeps m = -inf; 0 stands in so no weight is NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_run - m_ref)
        weight = tl.math.exp2(m_s - m_ref[:, None])
        l_run = l_run * alpha + tl.sum(weight * l_s, 1)
        acc = acc * alpha[:, None] + tl.sum(part * weight[:, :, None], 1)
        m_run = m_new
    l_run = tl.where(l_run == 0.0, 1.0, l_run)
    tl.store(out_ptrs, (acc / l_run[:, None]).to(out_ptrs.dtype.element_ty),
             mask=row_valid[:, None] & dim_valid[None, :])


@triton.jit
def decode_merge_kernel(
    out_ptr,
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    query_start_loc_ptr,
    num_tokens,
    num_heads,
    stride_out_token,
    stride_out_head,
    head_size,
    NUM_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Merge NUM_SPLITS partial softmax results of one (decode request, query head) with
    merge_splits, GROUP splits a step. Every split is read: without arrival counters the decode
    kernel's splits past the context wrote m = -inf, l = 0, which add nothing.
    Grid: (num_reqs, num_heads). Bytes: NUM_SPLITS * (head_size + 2) * 4 read, head_size
    elements written, per (request, head).
    """
    start_after_previous_kernel(USE_PDL)
    req = tl.program_id(0)
    head = tl.program_id(1)
    q_start, skipped = decode_query(query_start_loc_ptr, req, num_tokens)
    if skipped:
        return
    # One row: the head itself, merged as the decode kernel's last split merges its heads.
    heads = head + tl.arange(0, 1)
    dims = tl.arange(0, BLOCK_D)
    merge_splits(
        out_ptr + q_start.to(tl.int64) * stride_out_token + heads[:, None] * stride_out_head + dims[None, :],
        part_out_ptr, part_max_ptr, part_sum_ptr, (req.to(tl.int64) * num_heads + heads) * NUM_SPLITS,
        NUM_SPLITS, head_size, dims, dims < head_size, heads >= 0, GROUP,
    )
