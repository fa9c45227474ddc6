"""The split-K decode kernel merges its splits itself (the last split to finish, counted with
an atomic) to the same result as the separate merge kernel and as a float64 softmax reference,
and leaves its counters zeroed for the next launch; in a decode-only step it writes the new
keys and values into the cache itself before reading them. CPU, under the Triton interpreter, in a
subprocess so TRITON_INTERPRET=1 is set before Triton is imported."""

from __future__ import annotations

from triton_interpreter import run_interpreted

_INTERPRETED_CHECK = """
import torch
import dataclasses
from pagedllm.layers.attention.ops.decode_attention import decode_config, paged_decode_attention

torch.manual_seed(0)
num_heads, num_kv_heads, head_size, block_size = 4, 2, 16, 4
seq_lens = [3, 13, 30, 200]
num_blocks = 96
kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_size)
blocks = torch.randperm(num_blocks)
block_table = torch.zeros(len(seq_lens), 64, dtype=torch.int32)
cursor = 0
for row, length in enumerate(seq_lens):
    count = -(-length // block_size)
    block_table[row, :count] = blocks[cursor:cursor + count]
    cursor += count
query = torch.randn(len(seq_lens), num_heads, head_size)
query_start_loc = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
lens = torch.tensor(seq_lens, dtype=torch.int32)
scale = head_size ** -0.5

expected = torch.empty(len(seq_lens), num_heads, head_size, dtype=torch.float64)
for row, length in enumerate(seq_lens):
    slots = torch.arange(length)
    pages = block_table[row, slots // block_size].long()
    keys = kv_cache[0, pages, slots % block_size].double()      # [length, kv_heads, dim]
    values = kv_cache[1, pages, slots % block_size].double()
    for head in range(num_heads):
        kv = head // (num_heads // num_kv_heads)
        weights = torch.softmax(keys[:, kv] @ query[row, head].double() * scale, dim=0)
        expected[row, head] = weights @ values[:, kv]

counters = torch.zeros(64, dtype=torch.int32)
# 8-key tiles, so that 13 and up keys really split (the default float32 tile of 32 keys would
# give the short contexts one). In 32 splits 3 keys hold one (written directly, the others
# returning at once), 13 keys 2, 30 keys 4 and 200 keys 25: two groups of the fused merge's 16.
config = dataclasses.replace(decode_config(head_size, query.dtype), block_n=8)
for num_splits in (1, 4, 8, 32):
    for fused in (False, True):
        out = torch.full_like(query, float("nan"))
        paged_decode_attention(out, query, kv_cache, block_table, query_start_loc, lens, len(seq_lens), scale,
                               num_splits, config=config, split_counters=counters if fused else None)
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
        assert int(counters.abs().sum()) == 0, counters

# A row with no keys gives zeros and leaves its counters zeroed, whatever the split count.
empty_lens = lens.clone()
empty_lens[1] = 0
for num_splits in (1, 4, 32):
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(out, query, kv_cache, block_table, query_start_loc, empty_lens, len(seq_lens), scale,
                           num_splits, config=config, split_counters=counters)
    assert bool((out[1] == 0).all()), out[1]
    torch.testing.assert_close(out[[0, 2, 3]].double(), expected[[0, 2, 3]], rtol=0, atol=1e-5)
    assert int(counters.abs().sum()) == 0, counters

# A decode-only step's new keys and values (each request's last position) written by the
# kernel itself: their slots hold NaN until then, and afterwards what the cache held before.
last = torch.tensor(seq_lens) - 1
slot_mapping = block_table[torch.arange(len(seq_lens)), last // block_size].long() * block_size + last % block_size
pages, offsets = slot_mapping // block_size, slot_mapping % block_size
new_keys, new_values = kv_cache[0, pages, offsets].clone(), kv_cache[1, pages, offsets].clone()
for num_splits in (1, 4, 8, 32):
    kv_cache[:, pages, offsets] = float("nan")
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(out, query, kv_cache, block_table, query_start_loc, lens, len(seq_lens), scale,
                           num_splits, config=config, split_counters=counters,
                           new_kv=(new_keys, new_values, slot_mapping), write_new_kv=True)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(kv_cache[0, pages, offsets], new_keys, rtol=0, atol=0)
    torch.testing.assert_close(kv_cache[1, pages, offsets], new_values, rtol=0, atol=0)
# Slot -1 (a padded graph row) writes nothing.
kv_cache[:, pages[0], offsets[0]] = 7.0
paged_decode_attention(out, query, kv_cache, block_table, query_start_loc, lens, len(seq_lens), scale, 4,
                       split_counters=counters, new_kv=(new_keys, new_values, torch.full_like(slot_mapping, -1)),
                       write_new_kv=True)
assert bool((kv_cache[:, pages[0], offsets[0]] == 7.0).all())
print("ok")
"""


def test_decode_splits_merge_themselves_under_the_triton_interpreter():
    run_interpreted(_INTERPRETED_CHECK)
