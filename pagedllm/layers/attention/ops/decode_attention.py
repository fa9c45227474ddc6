"""Split-K (flash-decoding) attention for decode rows over a paged KV cache (Triton).

A decode row reads its whole context once, so it is bound by memory bandwidth. With few
requests one program per (request, KV head) would leave most SMs idle at long context, so the
context is split across num_splits programs whose partial softmax results are merged, by the
last of them to finish (counted with an atomic) or by a second kernel. num_splits depends only
on the batch size and head count (never on sequence lengths), so a decode step can be captured
in a CUDA graph and replayed at any context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm.layers.attention.ops.common import LOG2_E, dot_precision
from pagedllm.layers.attention.ops.decode_merge import (
    decode_merge_kernel,
    decode_query,
    merge_group,
    merge_splits,
)
from pagedllm.layers.ops.pdl import (
    allow_next_kernel,
    pdl_launch_options,
    wait_for_previous_kernel,
)

MAX_NUM_SPLITS = 32
"""Upper bound on splits; also bounds the partial-result buffers (num_reqs x heads x splits)."""

# Programs per SM that choose_num_splits aims for. More add merge work without adding
# bandwidth: on an H200 (Llama-3.1-8B heads, 256-16k keys, batch 1-32) half of the splits that
# 4 per SM (and a cap of 64) gave was as fast or faster at every batch size, e.g. batch 8 at 4k
# keys 41.3 us against 46.4 us, batch 1 at 4k 13.8 us against 15.8 us (BENCHMARKS.md).
_PROGRAMS_PER_SM = 2


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    block_n: int
    num_warps: int
    num_stages: int


def decode_config(head_size: int, dtype: torch.dtype) -> DecodeConfig:
    """Tiles of keys per loop iteration: 16-32 KiB of K+V per stage. Four stages measured best
    or within noise on an H100 (Qwen3-0.6B heads, batch 1 and 64, 4k and 32k context) and on an
    H200 (Llama-3.1-8B heads, batch 1-32, 256-16k keys: two stages were up to 12% slower)."""
    block_d = triton.next_power_of_2(head_size)
    block_n = 64 if block_d <= 128 else 32
    if dtype == torch.float32:
        block_n //= 2
    return DecodeConfig(block_n=block_n, num_warps=4, num_stages=4)


def choose_num_splits(num_reqs: int, num_kv_heads: int, num_sms: int, max_splits: int = MAX_NUM_SPLITS) -> int:
    """A power of two such that num_reqs * num_kv_heads * splits fills the GPU about twice.

    Depends only on the (padded) batch size, the head count and the device, never on
    sequence lengths: that is what makes the decode grid static under CUDA graphs."""
    wanted = triton.cdiv(_PROGRAMS_PER_SM * num_sms, max(1, num_reqs * num_kv_heads))
    return max(1, min(max_splits, triton.next_power_of_2(wanted)))


# Batch-size-dependent ints are not specialized on (== 1, % 16): one compiled variant serves
# every captured batch size, so a cold start compiles once instead of once per graph size.
# The block table's row stride is the widest request's block count in eager steps: leaving
# it unspecialized keeps one variant for every step (no compile in a user's first generate).
@triton.jit(do_not_specialize=["num_tokens", "num_splits", "write_kv", "stride_block_table"])
def _paged_decode_kernel(
    q_ptr,
    key_ptr,
    value_ptr,
    slot_mapping_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    split_counter_ptr,
    block_table_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    k_scale_ptr,
    v_scale_ptr,
    scale_log2,
    window,
    num_tokens,
    num_heads,
    num_splits,
    write_kv,
    stride_q_token,
    stride_q_head,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_out_token,
    stride_out_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_block_table,
    head_size,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MERGE_ROWS: tl.constexpr,
    MERGE_GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One split of the context of one decode request, for all query heads of one KV head.

    Layout: q/out [num_tokens, num_heads, head_size] (last dim contiguous); k/v cache
    [num_blocks, PAGE_SIZE, num_kv_heads, head_size] via block_table [num_reqs, max_blocks];
    partial results part_out [num_reqs, num_heads, num_splits, head_size] fp32 (unnormalised)
    and part_max/part_sum [num_reqs, num_heads, num_splits] fp32 (log2-domain running max and
    softmax denominator). With num_splits == 1 the normalised result goes straight to out.
    FUSED_MERGE: the last split of a (request, KV head) to finish, as counted in
    split_counter [num_reqs * num_kv_heads] int32 (zero between launches: the last one resets
    it), merges the partials itself, so no second kernel is launched.
    write_kv: the step's new key/value rows ([num_tokens, num_kv_heads, head_size], any
    token and head strides) go into the cache at slot_mapping (-1 skips) first, written by
    the split that reads their position, which then reads them back like any other key, so
    a decode-only step launches no cache-write kernel. 0: reshape_and_cache has written them.
    Grid: (num_reqs, num_kv_heads, num_splits); requests whose query length is not 1 exit.
    The split covers keys [start + split * chunk, start + (split + 1) * chunk) of the span
    [start, seq_len), chunk = span / num_splits rounded up to BLOCK_N; start is 0, or with
    USE_WINDOW seq_len - window (sliding window). Short spans leave splits past their end
    empty: only the num_active = ceil(span / chunk) splits that hold keys are merged. With
    FUSED_MERGE the others return at once, and a span that one split holds is written to out
    directly. Bytes: 2 * keys * head_size * elem per (request, KV head), the visible KV read
    once; FLOPs: 4 * keys * head_size per query head (negligible).
    """
    wait_for_previous_kernel(USE_PDL)
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start, skipped = decode_query(query_start_loc_ptr, req, num_tokens)
    if skipped:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    if USE_WINDOW:
        # The query (position seq_len - 1) sees keys seq_len - window .. seq_len - 1.
        range_start = tl.maximum(seq_len - window, 0)
    else:
        range_start = 0
    # A row with no keys (never made by the engine) still has one split, which writes zeros
    # and leaves its arrival counter at zero.
    span = tl.maximum(seq_len - range_start, 1)
    chunk = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    num_active = tl.cdiv(span, chunk)
    if FUSED_MERGE & (split >= num_active):
        return
    split_start = range_start + split * chunk
    split_end = tl.minimum(split_start + chunk, seq_len)

    rows = tl.arange(0, BLOCK_M)
    heads = kv_head * QUERIES_PER_KV + rows
    row_valid = rows < QUERIES_PER_KV
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < head_size
    if write_kv != 0:
        slot = tl.load(slot_mapping_ptr + q_start)
        if (slot >= 0) & (split_start <= seq_len - 1) & (seq_len - 1 < split_end):
            _write_new_kv(key_ptr + q_start.to(tl.int64) * stride_key_token + kv_head * stride_key_head,
                          value_ptr + q_start.to(tl.int64) * stride_value_token + kv_head * stride_value_head,
                          k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot.to(tl.int64), kv_head,
                          stride_cache_block, stride_cache_slot, stride_cache_head, dims, dim_valid,
                          PAGE_SIZE, KV_FP8)
            # The loop below reads the slot back, through other threads of this program.
            tl.debug_barrier()
    q = tl.load(
        q_ptr + q_start.to(tl.int64) * stride_q_token + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = block_table_ptr + req.to(tl.int64) * stride_block_table
    for start_n in range(split_start, split_end, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        n_valid = n < split_end
        page = tl.load(table_row + n // PAGE_SIZE, mask=n_valid, other=0).to(tl.int64)
        kv_off = page * stride_cache_block + (n % PAGE_SIZE) * stride_cache_slot + kv_head * stride_cache_head
        kv_mask = n_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:
            # An fp8 cache holds key / k_scale and value / v_scale.
            k = (k.to(tl.float32) * tl.load(k_scale_ptr)).to(q.dtype)
            v = (v.to(tl.float32) * tl.load(v_scale_ptr)).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        qk = tl.where(n_valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    allow_next_kernel(USE_PDL)

    if (num_splits == 1) | (FUSED_MERGE & (num_active == 1)):
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        tl.store(
            out_ptr + q_start.to(tl.int64) * stride_out_token + heads[:, None] * stride_out_head + dims[None, :],
            (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )
    else:
        # Without FUSED_MERGE the splits past the context still write m = -inf, l = 0, acc = 0,
        # so the merge kernel, which reads every split, never reads uninitialised memory.
        part_row = (req.to(tl.int64) * num_heads + heads) * num_splits + split
        tl.store(part_max_ptr + part_row, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part_row, l_i, mask=row_valid)
        tl.store(
            part_out_ptr + part_row[:, None] * head_size + dims[None, :],
            acc,
            mask=row_valid[:, None] & dim_valid[None, :],
        )
        if FUSED_MERGE:
            # acq_rel: this split's partials are visible before the count, and the last split
            # sees every other split's partials after it. Only the active splits count.
            counter = split_counter_ptr + req * tl.num_programs(1) + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel") == num_active - 1:
                tl.atomic_xchg(counter, 0)
                merge_heads = kv_head * QUERIES_PER_KV + tl.arange(0, MERGE_ROWS)
                merge_valid = tl.arange(0, MERGE_ROWS) < QUERIES_PER_KV
                merge_splits(
                    out_ptr + q_start.to(tl.int64) * stride_out_token + merge_heads[:, None] * stride_out_head
                    + dims[None, :],
                    part_out_ptr, part_max_ptr, part_sum_ptr, (req.to(tl.int64) * num_heads + merge_heads) * num_splits,
                    num_active, head_size, dims, dim_valid, merge_valid, MERGE_GROUP,
                )


@triton.jit
def _write_new_kv(key_row, value_row, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot, kv_head,
                  stride_cache_block, stride_cache_slot, stride_cache_head, dims, dim_valid,
                  PAGE_SIZE: tl.constexpr, KV_FP8: tl.constexpr):
    """One token's key and value of one KV head into its cache slot, as reshape_and_cache
    stores them (an fp8 cache holds value / scale saturated to +-448)."""
    offset = (slot // PAGE_SIZE) * stride_cache_block + (slot % PAGE_SIZE) * stride_cache_slot \
        + kv_head * stride_cache_head + dims
    k = tl.load(key_row + dims, mask=dim_valid)
    v = tl.load(value_row + dims, mask=dim_valid)
    if KV_FP8:
        k = tl.clamp(k.to(tl.float32) / tl.load(k_scale_ptr), -448.0, 448.0)
        v = tl.clamp(v.to(tl.float32) / tl.load(v_scale_ptr), -448.0, 448.0)
    tl.store(k_cache_ptr + offset, k.to(k_cache_ptr.dtype.element_ty), mask=dim_valid)
    tl.store(v_cache_ptr + offset, v.to(v_cache_ptr.dtype.element_ty), mask=dim_valid)


def paged_decode_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    num_reqs: int,
    scale: float,
    num_splits: int,
    sliding_window: int | None = None,
    config: DecodeConfig | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    split_counters: torch.Tensor | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    write_new_kv: bool = False,
) -> None:
    """Attention of every request whose query length is 1 (other rows untouched).

    out/query [num_tokens, num_heads, head_size]; kv_cache [2, num_blocks, block_size,
    num_kv_heads, head_size]. The grid is (num_reqs, num_kv_heads, num_splits) and the
    partial buffers are sized from the same host ints, so for a fixed padded batch size the
    launch is identical at every step (CUDA-graph safe). num_splits must be a power of two.
    sliding_window: the query sees only the last sliding_window keys. A float8_e4m3fn cache
    is dequantized with the scalar float32 k_scale / v_scale tensors. split_counters: a
    zeroed int32 tensor of at least num_reqs * num_kv_heads values that stays alive between
    launches (the kernel leaves it zeroed); with it the splits merge themselves and the
    second kernel is not launched. new_kv: the step's (key, value [num_tokens, num_kv_heads,
    head_size], slot_mapping [num_tokens] int64); with write_new_kv (a step whose rows all
    have query length 1) the kernel writes them into the cache itself, which spares the
    reshape_and_cache launch. Passed either way by the backend, so the pointer types, hence
    the compiled variant, are the same whether it writes or not.
    """
    num_tokens, num_heads, head_size = query.shape
    if num_tokens == 0 or num_reqs == 0:
        return
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two >= 1, got {num_splits}.")
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    kv_fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if kv_fp8 and (k_scale is None or v_scale is None):
        raise ValueError("An fp8 kv_cache needs k_scale and v_scale tensors.")
    num_kv_heads = k_cache.shape[2]
    queries_per_kv = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_size)
    # tl.dot needs at least 16 rows; the padding rows cost tensor-core time only.
    block_m = max(16, triton.next_power_of_2(queries_per_kv))
    # The merge has no tl.dot, so it holds only the KV head's own query heads.
    merge_rows = triton.next_power_of_2(queries_per_kv)
    config = config or decode_config(head_size, query.dtype)
    # The same value at every batch size the engine captures (one compiled variant): with a
    # single split there is nothing to merge and the flag is never read.
    fused_merge = split_counters is not None and (num_splits == 1 or split_counters.numel() >= num_reqs * num_kv_heads)
    if num_splits > 1:
        part_out = torch.empty(num_reqs, num_heads, num_splits, head_size, dtype=torch.float32, device=query.device)
        part_max = torch.empty(num_reqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
    else:
        # Never read or written with one split, but typed as with several, so that one
        # compiled variant serves both (pointer dtypes are part of Triton's signature).
        part_out = part_max = part_sum = torch.empty(1, dtype=torch.float32, device=query.device)
    if new_kv is None:
        if write_new_kv:
            raise ValueError("write_new_kv needs new_kv=(key, value, slot_mapping).")
        # Never read: stand-ins of the same types (the query for key and value).
        new_kv = (query, query, torch.empty(1, dtype=torch.int64, device=query.device))
    key, value, slot_mapping = new_kv
    _paged_decode_kernel[(num_reqs, num_kv_heads, num_splits)](
        query,
        key,
        value,
        slot_mapping,
        k_cache,
        v_cache,
        out,
        part_out,
        part_max,
        part_sum,
        split_counters if fused_merge else seq_lens,
        block_table,
        query_start_loc,
        seq_lens,
        k_scale if kv_fp8 else seq_lens,
        v_scale if kv_fp8 else seq_lens,
        scale * LOG2_E,
        sliding_window or 0,
        num_tokens,
        num_heads,
        num_splits,
        int(write_new_kv),
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_table.stride(0),
        head_size,
        QUERIES_PER_KV=queries_per_kv,
        BLOCK_M=block_m,
        MERGE_ROWS=merge_rows,
        MERGE_GROUP=merge_group(merge_rows),
        BLOCK_N=config.block_n,
        BLOCK_D=block_d,
        PAGE_SIZE=k_cache.shape[1],
        USE_WINDOW=sliding_window is not None,
        DOT_PRECISION=dot_precision(query.dtype),
        KV_FP8=kv_fp8,
        FUSED_MERGE=fused_merge,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_launch_options(query.device),
    )
    if num_splits > 1 and not fused_merge:
        decode_merge_kernel[(num_reqs, num_heads)](
            out,
            part_out,
            part_max,
            part_sum,
            query_start_loc,
            num_tokens,
            num_heads,
            out.stride(0),
            out.stride(1),
            head_size,
            NUM_SPLITS=num_splits,
            BLOCK_D=block_d,
            GROUP=min(num_splits, merge_group(1)),
            num_warps=4,
            **pdl_launch_options(query.device),
        )
