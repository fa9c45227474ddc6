"""KVCacheManager / BlockPool: allocation, reference counts, prefix caching, eviction order.

Plain Python, no model: block ids and token ids are checked exactly.
"""

from __future__ import annotations

import time

import pytest

from pagedllm.engine.block_pool import ROOT_BLOCK_HASH, hash_block_tokens
from pagedllm.engine.kv_cache_manager import KVCacheManager
from pagedllm.engine.request import Request
from pagedllm.engine.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(req_id: str, tokens: list[int], prompt_logprobs: int | None = None) -> Request:
    params = SamplingParams(max_tokens=16, prompt_logprobs=prompt_logprobs)
    return Request(req_id, list(tokens), params, eos_token_id=None, max_tokens=16)


def admit_and_compute(kv: KVCacheManager, request: Request) -> list[int]:
    """Admit a request the way the scheduler does, compute its whole prompt in one step and
    register its full blocks. Returns its block table."""
    hit_blocks, num_hit = kv.get_computed_blocks(request)
    new = kv.allocate_slots(request, request.num_tokens - num_hit, hit_blocks)
    assert new is not None
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_blocks(request, request.num_computed_tokens)
    return kv.get_block_ids(request)


def test_construction_of_a_million_blocks_is_fast() -> None:
    start = time.perf_counter()
    kv = KVCacheManager(1_000_000, 16, enable_prefix_caching=True)
    elapsed = time.perf_counter() - start
    assert kv.num_free_blocks == 1_000_000
    assert elapsed < 0.2, f"construction took {elapsed:.3f} s"


def test_invalid_sizes_raise_value_errors_naming_the_option() -> None:
    with pytest.raises(ValueError, match="num_blocks=0"):
        KVCacheManager(0, 16, True)
    with pytest.raises(ValueError, match="block_size=0"):
        KVCacheManager(10, 0, True)


def test_allocate_covers_tokens_and_returns_only_new_blocks() -> None:
    kv = KVCacheManager(10, BLOCK_SIZE, enable_prefix_caching=False)
    req = make_request("a", list(range(10)))
    assert kv.allocate_slots(req, 6) == [0, 1]  # 6 tokens -> 2 blocks; block 0 is usable
    req.num_computed_tokens = 6
    assert kv.allocate_slots(req, 2) == []  # 8 tokens still fit in 2 blocks
    req.num_computed_tokens = 8
    assert kv.allocate_slots(req, 2) == [2]
    assert kv.get_block_ids(req) == [0, 1, 2]
    assert kv.num_free_blocks == 7
    assert kv.usage == pytest.approx(0.3)


def test_get_block_ids_returns_a_copy() -> None:
    kv = KVCacheManager(10, BLOCK_SIZE, enable_prefix_caching=False)
    req = make_request("a", list(range(8)))
    kv.allocate_slots(req, 8)
    kv.get_block_ids(req).append(99)
    assert kv.get_block_ids(req) == [0, 1]


def test_failed_allocation_changes_nothing() -> None:
    kv = KVCacheManager(3, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_request("a", list(range(8)))
    admit_and_compute(kv, a)
    kv.free(a)  # blocks 0, 1 now cached and free
    b = make_request("b", list(range(8)) + [50] * 12)
    hit_blocks, num_hit = kv.get_computed_blocks(b)
    assert (hit_blocks, num_hit) == ([0, 1], 8)
    # 20 tokens need 5 blocks, 2 of them hits: 3 new + 2 revived > 3 free.
    assert kv.allocate_slots(b, 12, hit_blocks) is None
    assert kv.get_block_ids(b) == []
    assert kv.num_free_blocks == 3
    assert kv.block_pool.ref_count(0) == 0
    assert kv.get_computed_blocks(make_request("c", list(range(9)))) == ([0, 1], 8)


def test_free_returns_blocks_and_ref_counts_track_sharing() -> None:
    kv = KVCacheManager(8, BLOCK_SIZE, enable_prefix_caching=True)
    prompt = list(range(9))
    a, b = make_request("a", prompt), make_request("b", prompt)
    blocks_a = admit_and_compute(kv, a)
    blocks_b = admit_and_compute(kv, b)
    assert blocks_b[:2] == blocks_a[:2]  # the two full blocks are shared
    assert blocks_b[2] != blocks_a[2]  # the partial last block never is
    pool = kv.block_pool
    assert [pool.ref_count(i) for i in blocks_a[:2]] == [2, 2]
    assert kv.num_free_blocks == 8 - 4
    kv.free(a)
    assert [pool.ref_count(i) for i in blocks_a[:2]] == [1, 1]
    assert kv.num_free_blocks == 8 - 3
    kv.free(b)
    assert kv.num_free_blocks == 8
    kv.free(b)  # freeing twice is a no-op: the request holds nothing any more
    assert kv.num_free_blocks == 8


def test_prefix_hit_across_requests_sharing_a_prefix() -> None:
    kv = KVCacheManager(16, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13])
    blocks_a = admit_and_compute(kv, a)
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 99, 12, 13, 14])
    assert kv.get_computed_blocks(b) == (blocks_a[:2], 8)
    kv.free(a)  # cached blocks outlive their request
    assert kv.get_computed_blocks(b) == (blocks_a[:2], 8)
    stats = kv.prefix_cache_stats
    admit_and_compute(kv, b)
    assert (stats.num_requests, stats.num_query_tokens, stats.num_hit_tokens) == (2, 13 + 14, 8)


def test_same_block_tokens_under_a_different_parent_do_not_hit() -> None:
    kv = KVCacheManager(16, BLOCK_SIZE, enable_prefix_caching=True)
    x, y, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
    admit_and_compute(kv, make_request("a", x + y + [0]))
    assert hash_block_tokens(hash_block_tokens(ROOT_BLOCK_HASH, x), y) != hash_block_tokens(
        hash_block_tokens(ROOT_BLOCK_HASH, z), y
    )
    assert kv.get_computed_blocks(make_request("b", z + y + [0])) == ([], 0)
    # And a block's position matters: y first is not y second.
    assert kv.get_computed_blocks(make_request("c", y + [0])) == ([], 0)


def test_hit_is_capped_to_leave_one_token_to_compute() -> None:
    kv = KVCacheManager(16, BLOCK_SIZE, enable_prefix_caching=True)
    prompt = list(range(12))
    blocks = admit_and_compute(kv, make_request("a", prompt + [100]))
    # Exactly three full blocks cached; a request of exactly those 12 tokens hits only 2
    # blocks (max hit = 11 tokens, rounded down to full blocks).
    assert kv.get_computed_blocks(make_request("b", prompt)) == (blocks[:2], 8)
    assert kv.get_computed_blocks(make_request("c", prompt + [7])) == (blocks[:3], 12)


def test_prefix_caching_off_or_prompt_logprobs_never_hit() -> None:
    kv_off = KVCacheManager(16, BLOCK_SIZE, enable_prefix_caching=False)
    admit_and_compute(kv_off, make_request("a", list(range(9))))
    assert kv_off.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    assert kv_off.block_pool.num_cached_blocks == 0

    kv = KVCacheManager(16, BLOCK_SIZE, enable_prefix_caching=True)
    admit_and_compute(kv, make_request("a", list(range(9))))
    wants_prompt_logprobs = make_request("b", list(range(9)), prompt_logprobs=0)
    assert kv.get_computed_blocks(wants_prompt_logprobs) == ([], 0)


def test_only_computed_full_blocks_are_cached_and_output_tokens_count() -> None:
    kv = KVCacheManager(16, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_request("a", list(range(10)))
    assert kv.allocate_slots(a, 6, []) is not None
    a.num_computed_tokens = 6
    kv.cache_full_blocks(a, 6)  # a chunk of 6: one full block computed
    assert kv.block_pool.num_cached_blocks == 1
    assert kv.allocate_slots(a, 4) is not None
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a, 10)
    assert kv.block_pool.num_cached_blocks == 2  # tokens 8, 9 fill half a block
    a.output_token_ids += [70, 71]  # decoding fills block 2 with prompt + output tokens
    assert kv.allocate_slots(a, 1) == []
    a.num_computed_tokens = 11
    kv.cache_full_blocks(a, 11)
    assert kv.block_pool.num_cached_blocks == 2  # token 71's KV is not computed yet
    assert kv.allocate_slots(a, 1) == []
    a.num_computed_tokens = 12
    kv.cache_full_blocks(a, 12)
    assert kv.block_pool.num_cached_blocks == 3
    follower = make_request("b", list(range(10)) + [70, 71, 5])
    assert kv.get_computed_blocks(follower) == (kv.get_block_ids(a), 12)


def test_lru_eviction_takes_oldest_freed_and_tail_blocks_first() -> None:
    kv = KVCacheManager(6, BLOCK_SIZE, enable_prefix_caching=True)
    old = make_request("old", [1] * 12 + [0])  # 3 full blocks + 1
    new = make_request("new", [2] * 4 + [0])
    blocks_old = admit_and_compute(kv, old)
    blocks_new = admit_and_compute(kv, new)
    assert kv.num_free_blocks == 0
    kv.free(old)
    kv.free(new)
    # Unhashed (partial) blocks go first, then old's tail, then its middle block.
    filler = make_request("filler", [3] * 12)
    assert kv.allocate_slots(filler, 12, []) == [blocks_new[1], blocks_old[3], blocks_old[2]]
    assert kv.get_computed_blocks(make_request("x", [1] * 12 + [0])) == (blocks_old[:2], 8)
    assert kv.get_computed_blocks(make_request("y", [2] * 4 + [0])) == (blocks_new[:1], 4)
    assert kv.allocate_slots(make_request("z", [4] * 4), 4, []) == [blocks_old[1]]


def test_hit_revives_a_free_cached_block_and_protects_it_from_eviction() -> None:
    kv = KVCacheManager(4, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_request("a", [1] * 8 + [0])  # blocks 0, 1 hashed; block 2 partial
    c = make_request("c", [7] * 4)  # block 3 hashed
    blocks_a = admit_and_compute(kv, a)
    blocks_c = admit_and_compute(kv, c)
    kv.free(a)
    kv.free(c)  # eviction queue, oldest first: a's blocks 1, 0, then c's block 3
    b = make_request("b", [1] * 8 + [5] * 8)
    hit_blocks, num_hit = kv.get_computed_blocks(b)
    assert (hit_blocks, num_hit) == (blocks_a[:2], 8)
    # b needs the 2 revived hits plus 2 new blocks: the unhashed block 2, then the oldest
    # cached block that is not a hit (c's), although the hits were older in the queue.
    new = kv.allocate_slots(b, 8, hit_blocks)
    assert new == [blocks_a[2], blocks_c[0]]
    assert kv.get_block_ids(b) == blocks_a[:2] + new
    assert kv.num_free_blocks == 0
    assert [kv.block_pool.ref_count(i) for i in range(4)] == [1, 1, 1, 1]
    assert kv.get_computed_blocks(make_request("d", [7] * 4 + [0])) == ([], 0)  # c evicted


def test_identical_blocks_computed_twice_keep_one_cache_entry() -> None:
    kv = KVCacheManager(8, BLOCK_SIZE, enable_prefix_caching=True)
    prompt = list(range(9))
    a, b = make_request("a", prompt), make_request("b", prompt)
    # Both admitted before either computed anything: no hits, separate blocks.
    for req in (a, b):
        assert kv.allocate_slots(req, 9, kv.get_computed_blocks(req)[0]) is not None
    for req in (a, b):
        req.num_computed_tokens = 9
        kv.cache_full_blocks(req, 9)
    blocks_a = kv.get_block_ids(a)
    assert kv.block_pool.num_cached_blocks == 2
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 8
    assert kv.get_computed_blocks(make_request("c", prompt)) == (blocks_a[:2], 8)


def test_reset_prefix_cache_only_when_idle() -> None:
    kv = KVCacheManager(8, BLOCK_SIZE, enable_prefix_caching=True)
    a = make_request("a", list(range(9)))
    admit_and_compute(kv, a)
    assert kv.reset_prefix_cache() is False
    kv.free(a)
    assert kv.reset_prefix_cache() is True
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    assert kv.num_free_blocks == 8
