"""The torch SDPA backend against attention written out by hand (softmax(q k^T * scale) v over
the keys each query may see), in float64 for the reference. Tolerance 1e-5 (fp32 inputs).

Every case uses shuffled, non-contiguous blocks and fills every cache slot nobody wrote with
NaN, so reading a slot outside a request's history poisons its output."""

from __future__ import annotations

import pytest
import torch

from pagedllm.forward_context import AttentionMetadata, set_forward_context
from pagedllm.layers.attention.backends.torch_sdpa import TorchSDPAAttention, write_kv_cache
from pagedllm.layers.attention.kv_cache_spec import KVCacheSpec
from pagedllm.layers.attention.layer import Attention
from pagedllm.layers.attention.selector import get_attn_backend

HEADS, KV_HEADS, HEAD, BLOCK, NUM_BLOCKS = 4, 2, 8, 4, 24
SCALE = HEAD**-0.5


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """q [q_len, H, D] are the last queries of a sequence whose keys/values are k, v [kv_len, Hkv, D]."""
    q_len, kv_len = q.shape[0], k.shape[0]
    k = k.double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * SCALE
    query_pos = torch.arange(kv_len - q_len, kv_len).unsqueeze(1)
    key_pos = torch.arange(kv_len).unsqueeze(0)
    visible = key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).float()


def metadata(query_lens: list[int], seq_lens: list[int], tables: list[list[int]], padding: int = 0) -> AttentionMetadata:
    starts = [0]
    slots = []
    for q_len, seq_len, table in zip(query_lens, seq_lens, tables, strict=True):
        starts.append(starts[-1] + q_len)
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(seq_len - q_len, seq_len)]
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        num_actual_tokens=starts[-1], num_reqs=len(query_lens), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots + [-1] * padding), query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )


@pytest.mark.parametrize("window", [None, 3])
def test_mixed_batch_over_paged_history_matches_reference(window: int | None) -> None:
    torch.manual_seed(0)
    # A chunk over history, a decode, a fresh prefill, a two-token chunk; plus 2 padding rows.
    query_lens, seq_lens = [5, 1, 6, 2], [11, 9, 6, 14]
    perm = torch.randperm(NUM_BLOCKS).tolist()
    tables, used = [], 0
    for seq_len in seq_lens:
        n = -(-seq_len // BLOCK)
        tables.append(perm[used : used + n])
        used += n
    keys = [torch.randn(n, KV_HEADS, HEAD) for n in seq_lens]
    values = [torch.randn(n, KV_HEADS, HEAD) for n in seq_lens]
    kv_cache = torch.full((2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD), float("nan"))
    history = [s - q for q, s in zip(query_lens, seq_lens)]
    past = metadata(history, history, tables)
    write_kv_cache(kv_cache, torch.cat([k[:h] for k, h in zip(keys, history)]),
                   torch.cat([v[:h] for v, h in zip(values, history)]), past.slot_mapping)

    step = metadata(query_lens, seq_lens, tables, padding=2)
    queries = [torch.randn(q, HEADS, HEAD) for q in query_lens]
    pad_q, pad_kv = torch.randn(2, HEADS, HEAD), torch.randn(2, KV_HEADS, HEAD)
    out = TorchSDPAAttention(sliding_window=window).forward(
        torch.cat(queries + [pad_q]),
        torch.cat([k[h:] for k, h in zip(keys, history)] + [pad_kv]),
        torch.cat([v[h:] for v, h in zip(values, history)] + [pad_kv]),
        kv_cache, step, SCALE,
    )
    expected = torch.cat([reference(q, k, v, window) for q, k, v in zip(queries, keys, values)])
    torch.testing.assert_close(out[: step.num_actual_tokens], expected, atol=1e-5, rtol=0)
    assert torch.all(out[step.num_actual_tokens :] == 0)
    # Every token of every request is now in the cache, at its slot.
    every = metadata(seq_lens, seq_lens, tables)
    torch.testing.assert_close(kv_cache[0].view(-1, KV_HEADS, HEAD)[every.slot_mapping], torch.cat(keys))


def test_without_cache_each_request_attends_causally_within_itself() -> None:
    torch.manual_seed(1)
    lens = [3, 7, 1]
    q = [torch.randn(n, HEADS, HEAD) for n in lens]
    k = [torch.randn(n, KV_HEADS, HEAD) for n in lens]
    v = [torch.randn(n, KV_HEADS, HEAD) for n in lens]
    md = metadata(lens, lens, [[0, 1]] * 3)
    out = TorchSDPAAttention().forward(torch.cat(q), torch.cat(k), torch.cat(v), None, md, SCALE)
    expected = torch.cat([reference(*args, None) for args in zip(q, k, v)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_attention_layer_reads_forward_context_and_declares_its_cache() -> None:
    torch.manual_seed(2)
    layer = Attention(HEADS, HEAD, SCALE, KV_HEADS, prefix="model.layers.0.self_attn.attn", sliding_window=5)
    assert layer.kv_cache is None and layer.impl.name == "TORCH_SDPA"
    q, k, v = torch.randn(4, HEADS * HEAD), torch.randn(4, KV_HEADS * HEAD), torch.randn(4, KV_HEADS * HEAD)
    with set_forward_context(metadata([4], [4], [[0]])):
        out = layer(q, k, v)
    expected = reference(q.view(4, HEADS, HEAD), k.view(4, KV_HEADS, HEAD), v.view(4, KV_HEADS, HEAD), 5)
    torch.testing.assert_close(out, expected.flatten(1), atol=1e-5, rtol=0)
    assert layer.kv_cache_spec() == KVCacheSpec(KV_HEADS, HEAD, torch.float32, 5)


def test_page_size_counts_keys_and_values_of_every_slot() -> None:
    assert KVCacheSpec(num_kv_heads=8, head_size=128, dtype=torch.bfloat16).page_size_bytes(16) == 2 * 16 * 8 * 128 * 2


def test_cpu_selects_the_torch_sdpa_backend() -> None:
    assert get_attn_backend(torch.device("cpu"), torch.float32) is TorchSDPAAttention
