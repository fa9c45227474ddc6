"""Varlen causal attention over a paged KV cache for query chunks of any length (Triton).

This is the path for prefill chunks (with or without history) and, before the cache exists,
for plain causal attention within each request's fresh tokens. Decode rows (query length 1)
in a mixed batch are skipped here and handled by the split-K kernel in decode_attention.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.layers.attention.ops.common import LOG2_E, TileConfig, dot_precision, tile_config


@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, q_block, BLOCK_Q: tl.constexpr):
    """Largest request i with query_start_loc[i] // BLOCK_Q + i <= q_block (binary search).

    Request i owns the q blocks query_start_loc[i] // BLOCK_Q + i ... query_start_loc[i+1] //
    BLOCK_Q + i, which is at least cdiv(query_len_i, BLOCK_Q) blocks; so a grid of
    num_tokens // BLOCK_Q + num_reqs programs covers every request with no host-side scan.
    """
    lo = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, k_ptr, v_ptr, table_row, start_n, kv_end, q_pos, window, kv_head, dims, dim_valid,
    scale_log2, stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
    k_scale, v_scale,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, KV_FROM_CACHE: tl.constexpr, MASKED: tl.constexpr,
    USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
):
    """One online-softmax step over keys start_n .. start_n + BLOCK_N. Without MASKED every
    key is below kv_end and visible to every row (causally and within the window). With
    MASKED a row sees key n when n <= q_pos and, with USE_WINDOW, n > q_pos - window.
    With KV_FROM_CACHE table_row points at the request's block-table row; otherwise it is
    the request's first token row in the fresh K/V."""
    n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        n_valid = n < kv_end
    else:
        n_valid = n >= 0
    if KV_FROM_CACHE:
        page = tl.load(table_row + n // PAGE_SIZE, mask=n_valid, other=0).to(tl.int64)
        k_off = page * stride_k_block + (n % PAGE_SIZE) * stride_k_slot + kv_head * stride_k_head
        v_off = page * stride_v_block + (n % PAGE_SIZE) * stride_v_slot + kv_head * stride_v_head
    else:
        fresh = (table_row + n).to(tl.int64)
        k_off = fresh * stride_k_block + kv_head * stride_k_head
        v_off = fresh * stride_v_block + kv_head * stride_v_head
    kv_mask = n_valid[:, None] & dim_valid[None, :]
    k = tl.load(k_ptr + k_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + v_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    if KV_FP8:
        # An fp8 cache holds key / k_scale and value / v_scale.
        k = (k.to(tl.float32) * k_scale).to(q.dtype)
        v = (v.to(tl.float32) * v_scale).to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    if MASKED:
        visible = (n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        if USE_WINDOW:
            visible = visible & (n[None, :] > q_pos[:, None] - window)
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:
        # A row whose keys so far are all masked keeps m = -inf; shift by 0 instead to avoid
        # inf - inf = NaN (its p and alpha are then exactly 0 and 1).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    p = tl.math.exp2(qk - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# Step-dependent ints are not specialized on (== 1, % 16): one compiled variant per shape class.
# The block table's row stride is the widest request's block count: unspecialized, as in
# decode_attention.py.
@triton.jit(do_not_specialize=["num_reqs", "num_tokens", "stride_block_table"])
def _paged_prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    block_table_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    k_scale_ptr,
    v_scale_ptr,
    scale_log2,
    window,
    num_reqs,
    num_tokens,
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_block_table,
    head_size,
    NUM_KV_HEADS: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    QUERIES_PER_KV_P2: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    KV_FROM_CACHE: tl.constexpr,
    SKIP_DECODE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Flash-attention forward for BLOCK_Q query tokens x all query heads of one KV head.

    Layout: q/out [num_tokens, num_heads, head_size] (last dim contiguous); with KV_FROM_CACHE
    k/v are kv_cache[0]/[1] [num_blocks, PAGE_SIZE, num_kv_heads, head_size] addressed through
    block_table [num_reqs, max_blocks] (int32); without it k/v are the fresh
    [num_tokens, num_kv_heads, head_size] tensors (stride_*_slot unused) and every seq_len
    equals its query length. Tile rows are (token, head-in-group) pairs: row m is query token
    m // QUERIES_PER_KV_P2 of the block and head kv_head * QUERIES_PER_KV + m % QUERIES_PER_KV_P2,
    so each K/V tile is loaded once for the whole GQA group. With USE_WINDOW a query at
    position p sees keys p - window + 1 .. p (sliding window), and tiles outside are skipped.
    Grid: ((num_tokens // BLOCK_Q + num_reqs) * NUM_KV_HEADS,); surplus programs exit at once.
    Work per request of q query tokens over s keys: 4 * q * (s - q/2) * head_size * num_heads
    FLOPs; bytes: Q and out once, K/V of the visible prefix once per q block and KV head.
    """
    # 1-D grid, KV head fastest, q blocks in reverse: the last q blocks of a request see the
    # most keys, so starting them first keeps the causal tail from idling the GPU.
    pid = tl.program_id(0)
    kv_head = pid % NUM_KV_HEADS
    q_block = tl.num_programs(0) // NUM_KV_HEADS - 1 - pid // NUM_KV_HEADS
    req = _find_request(query_start_loc_ptr, num_reqs, q_block, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    local_block = q_block - (q_start // BLOCK_Q + req)
    if local_block * BLOCK_Q >= q_len:
        return
    if SKIP_DECODE:
        if q_len == 1:
            return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_index = local_block * BLOCK_Q + rows // QUERIES_PER_KV_P2
    head_in_group = rows % QUERIES_PER_KV_P2
    heads = kv_head * QUERIES_PER_KV + head_in_group
    token = q_start + q_index
    # token < num_tokens only guards against inconsistent metadata; it never drops a real row.
    row_valid = (q_index < q_len) & (head_in_group < QUERIES_PER_KV) & (token < num_tokens)
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < head_size
    q = tl.load(
        q_ptr + token[:, None] * stride_q_token + heads[:, None] * stride_q_head + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    q_pos = context_len + q_index

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    first_q_pos = context_len + local_block * BLOCK_Q
    kv_end = tl.minimum(seq_len, first_q_pos + BLOCK_Q)
    # Keys in [mid_start, full_end) are visible to every row of the block, so those whole
    # tiles run without any mask; [lo, mid_start) (the window's trailing edge) and
    # [full_end, kv_end) (the causal diagonal) are masked.
    full_end = ((first_q_pos + 1) // BLOCK_N) * BLOCK_N
    if USE_WINDOW:
        lo = (tl.maximum(first_q_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
        mid_start = tl.cdiv(tl.maximum(kv_end - window, 0), BLOCK_N) * BLOCK_N
        mid_start = tl.minimum(tl.maximum(mid_start, lo), full_end)
    else:
        lo = 0
        mid_start = 0
    if KV_FP8:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    else:
        k_scale = 1.0
        v_scale = 1.0
    if KV_FROM_CACHE:
        table_row = block_table_ptr + req.to(tl.int64) * stride_block_table
    else:
        table_row = q_start
    for start_n in range(lo, mid_start, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_ptr, v_ptr, table_row, start_n, kv_end, q_pos, window, kv_head, dims, dim_valid,
            scale_log2, stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
            k_scale, v_scale, BLOCK_N, PAGE_SIZE, KV_FROM_CACHE, True, USE_WINDOW, DOT_PRECISION, KV_FP8,
        )
    for start_n in range(mid_start, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_ptr, v_ptr, table_row, start_n, kv_end, q_pos, window, kv_head, dims, dim_valid,
            scale_log2, stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
            k_scale, v_scale, BLOCK_N, PAGE_SIZE, KV_FROM_CACHE, False, USE_WINDOW, DOT_PRECISION, KV_FP8,
        )
    for start_n in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_ptr, v_ptr, table_row, start_n, kv_end, q_pos, window, kv_head, dims, dim_valid,
            scale_log2, stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
            k_scale, v_scale, BLOCK_N, PAGE_SIZE, KV_FROM_CACHE, True, USE_WINDOW, DOT_PRECISION, KV_FP8,
        )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        out_ptr + token[:, None] * stride_out_token + heads[:, None] * stride_out_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dim_valid[None, :],
    )


def paged_prefill_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_source: torch.Tensor,
    value_source: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    num_reqs: int,
    scale: float,
    kv_from_cache: bool,
    skip_decode: bool,
    sliding_window: int | None = None,
    config: TileConfig | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Causal varlen attention, written into out [num_tokens, num_heads, head_size].

    With kv_from_cache, key_source/value_source are kv_cache[0]/kv_cache[1]
    [num_blocks, block_size, num_kv_heads, head_size]; otherwise they are the step's
    key/value [num_tokens, num_kv_heads, head_size] and seq_lens must equal the query lengths.
    skip_decode leaves rows of requests with query length 1 unwritten (decode kernel's job).
    sliding_window: each query sees only its last sliding_window keys (itself included).
    The grid uses only num_tokens (query.shape[0]) and the host int num_reqs. A float8_e4m3fn
    cache is dequantized with the scalar float32 k_scale / v_scale tensors.
    """
    num_tokens, num_heads, head_size = query.shape
    if num_tokens == 0 or num_reqs == 0:
        return
    kv_fp8 = kv_from_cache and key_source.dtype == torch.float8_e4m3fn
    if kv_fp8 and (k_scale is None or v_scale is None):
        raise ValueError("An fp8 kv_cache needs k_scale and v_scale tensors.")
    num_kv_heads = key_source.shape[-2]
    queries_per_kv = num_heads // num_kv_heads
    queries_per_kv_p2 = triton.next_power_of_2(queries_per_kv)
    block_d = triton.next_power_of_2(head_size)
    config = config or tile_config(block_d, query.dtype, queries_per_kv_p2)
    block_q = config.block_m // queries_per_kv_p2
    if kv_from_cache:
        page_size = key_source.shape[1]
        k_strides = (key_source.stride(0), key_source.stride(1), key_source.stride(2))
        v_strides = (value_source.stride(0), value_source.stride(1), value_source.stride(2))
        table_stride = block_table.stride(0)
    else:
        page_size = 1
        k_strides = (key_source.stride(0), 0, key_source.stride(1))
        v_strides = (value_source.stride(0), 0, value_source.stride(1))
        table_stride = 0
    grid = ((num_tokens // block_q + num_reqs) * num_kv_heads,)
    _paged_prefill_kernel[grid](
        query,
        key_source,
        value_source,
        out,
        block_table,
        query_start_loc,
        seq_lens,
        k_scale if kv_fp8 else seq_lens,
        v_scale if kv_fp8 else seq_lens,
        scale * LOG2_E,
        sliding_window or 0,
        num_reqs,
        num_tokens,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        *k_strides,
        *v_strides,
        table_stride,
        head_size,
        NUM_KV_HEADS=num_kv_heads,
        QUERIES_PER_KV=queries_per_kv,
        QUERIES_PER_KV_P2=queries_per_kv_p2,
        BLOCK_Q=block_q,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=block_d,
        PAGE_SIZE=page_size,
        KV_FROM_CACHE=kv_from_cache,
        SKIP_DECODE=skip_decode,
        USE_WINDOW=sliding_window is not None,
        DOT_PRECISION=dot_precision(query.dtype),
        KV_FP8=kv_fp8,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
