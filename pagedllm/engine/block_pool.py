"""The pool of KV cache blocks: reference counts, free blocks and the prefix-cache hash map.

Plain Python over block ids, no torch. Per-block state is one list of ints plus dicts that
only hold blocks that were ever hashed, so a pool of a million blocks is built in
milliseconds: blocks never allocated yet are a counter, not objects.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

BlockHash = bytes
"""sha256 digest of (parent block's hash, this block's token ids)."""

# The parent of a sequence's first block. Any fixed value works: it only has to be the
# same for every request so that equal first blocks hash equally.
ROOT_BLOCK_HASH: BlockHash = bytes(32)


def hash_block_tokens(
    parent_hash: BlockHash, token_ids: Sequence[int], extra_keys: Sequence[str] = ()
) -> BlockHash:
    """Hash of one full block, chained on its parent's hash so that a hit on block i implies
    the whole prefix up to block i matches.

    sha256 rather than Python's hash(): a collision would make one request attend over
    another's KV (wrong output, and a leak between users). Python's tuple hash is 64-bit and
    easy to collide on purpose with crafted prompts; sha256's 256 bits make an accidental
    collision among even 2**40 cached blocks about 2**-177 likely, and a deliberate one
    infeasible. Cost: about a microsecond per block of 16 tokens, paid once per full block.
    """
    # int64 keeps every token id exact (vocabularies fit easily); the fixed-width bytes keep
    # block boundaries unambiguous, which a text encoding like "1,23" would not.
    digest = hashlib.sha256(parent_hash + array("q", token_ids).tobytes())
    for key in extra_keys:
        digest.update(b"\x00" + key.encode())
    return digest.digest()


class BlockPool:
    """Allocates, shares and frees KV cache blocks.

    A block is in exactly one of: in use (ref count > 0); free and never used; free without
    a hash; free with a hash (still a prefix-cache entry, revivable by a later hit). Free
    blocks are handed out in that order of preference: blocks with no cached content
    first, then hashed ones least recently freed first (LRU), so a reallocation evicts the
    oldest cached content and nothing useful while worthless blocks remain.
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref_counts = [0] * num_blocks
        self._next_fresh_block = 0
        """Blocks from here to num_blocks - 1 were never allocated."""
        self._free_uncached: list[int] = []
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        """Free blocks that hold a hash, oldest first: the eviction order."""
        self._hash_to_block: dict[BlockHash, int] = {}
        self._block_to_hash: dict[int, BlockHash] = {}

    @property
    def num_free_blocks(self) -> int:
        return (
            self.num_blocks - self._next_fresh_block + len(self._free_uncached) + len(self._free_cached)
        )

    @property
    def num_cached_blocks(self) -> int:
        """Blocks that hold a prefix-cache entry, in use or free."""
        return len(self._block_to_hash)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def get_cached_block(self, block_hash: BlockHash) -> int | None:
        return self._hash_to_block.get(block_hash)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks (ref count 1 each); evicts cached content as needed.
        The caller checks num_free_blocks first."""
        assert num_blocks <= self.num_free_blocks, (num_blocks, self.num_free_blocks)
        block_ids: list[int] = []
        ref_counts = self._ref_counts
        for _ in range(num_blocks):
            if self._free_uncached:
                block_id = self._free_uncached.pop()
            elif self._next_fresh_block < self.num_blocks:
                block_id = self._next_fresh_block
                self._next_fresh_block += 1
            else:
                block_id, _ = self._free_cached.popitem(last=False)
                del self._hash_to_block[self._block_to_hash.pop(block_id)]
            ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Share cached blocks with one more request; a free one leaves the free queue."""
        ref_counts = self._ref_counts
        for block_id in block_ids:
            if ref_counts[block_id] == 0:
                del self._free_cached[block_id]
            ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block, in the order given: blocks reaching zero that
        hold a hash join the eviction queue in that order (the first is evicted first)."""
        ref_counts = self._ref_counts
        for block_id in block_ids:
            ref_counts[block_id] -= 1
            assert ref_counts[block_id] >= 0, f"block {block_id} freed more often than allocated"
            if ref_counts[block_id] == 0:
                if block_id in self._block_to_hash:
                    self._free_cached[block_id] = None
                else:
                    self._free_uncached.append(block_id)

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a full, computed block under its hash. Returns False (and leaves the block
        unhashed) when another block already holds that content: two requests with the same
        prefix computed it in the same steps; the first one stays the cache entry."""
        assert self._ref_counts[block_id] > 0, f"block {block_id} is cached while free"
        assert block_id not in self._block_to_hash, f"block {block_id} is hashed twice"
        if not self.enable_caching or block_hash in self._hash_to_block:
            return False
        self._hash_to_block[block_hash] = block_id
        self._block_to_hash[block_id] = block_hash
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block. Only possible while no block is in use (a running
        request's hashed blocks cannot be un-hashed under it); returns whether it happened."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self._free_uncached.extend(self._free_cached)
        self._free_cached.clear()
        self._hash_to_block.clear()
        self._block_to_hash.clear()
        return True
