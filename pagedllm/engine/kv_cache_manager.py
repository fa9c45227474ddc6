"""Which KV cache blocks each request holds, with automatic prefix caching. No torch.

A request's block list covers its tokens in order (token i lives in block i // block_size,
slot i % block_size). Prefix caching: once every token of a full block has its KV computed,
the block is registered under a hash chained on its parent's (see block_pool), and a later
request whose tokens start the same way shares those blocks instead of computing them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from pagedllm.engine.block_pool import ROOT_BLOCK_HASH, BlockHash, BlockPool, hash_block_tokens
from pagedllm.engine.request import Request

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PrefixCacheStats:
    """Cumulative counts since start-up (or the last reset), for logging hit rates."""

    num_requests: int = 0
    """Admissions that looked the prefix cache up (a resumed request counts again)."""
    num_query_tokens: int = 0
    num_hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0


def salted_root_hash(cache_salt: str | None) -> BlockHash:
    """The parent hash of a request's first block: a cache_salt changes it, so the salted
    request's whole chain of block hashes (its prefix-cache namespace) differs."""
    if cache_salt is None:
        return ROOT_BLOCK_HASH
    return hashlib.sha256(ROOT_BLOCK_HASH + cache_salt.encode("utf-8")).digest()


class KVCacheManager:
    """Allocates and frees the KV cache blocks of requests and shares cached prefixes.

    Usage per step, by the scheduler:
    - a waiting request: `blocks, n = get_computed_blocks(req)`, then
      `allocate_slots(req, num_new_tokens, blocks)`, then `req.num_computed_tokens = n`;
    - a running request: `allocate_slots(req, num_new_tokens)`;
    - after the step ran: `cache_full_blocks(req, req.num_computed_tokens)`;
    - when it finishes or is preempted: `free(req)`.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(
                f"num_blocks={num_blocks} leaves no KV cache; give the cache more memory "
                "(gpu_memory_utilization, kv_cache_memory_bytes or PAGEDLLM_CPU_KVCACHE_SPACE)."
            )
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be a positive number of tokens, e.g. 16.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks, enable_prefix_caching)
        self.prefix_cache_stats = PrefixCacheStats()
        self._req_to_blocks: dict[str, list[int]] = {}
        self._req_to_hashes: dict[str, list[BlockHash]] = {}
        """Hashes of the request's full blocks computed so far (a prefix of all of them)."""
        self._num_cached_blocks: dict[str, int] = {}
        """How many of the request's leading blocks are already registered in the cache."""

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (free blocks that only hold cached content count as free)."""
        return 1.0 - self.block_pool.num_free_blocks / self.num_blocks

    def get_block_ids(self, request: Request) -> list[int]:
        """A copy of the request's block table: receivers may append to it."""
        return list(self._req_to_blocks.get(request.request_id, ()))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of the request's full blocks and its length in tokens.

        At most num_tokens - 1 tokens hit, so at least one token is computed and the step
        produces logits to sample from. Nothing is reserved: pass the blocks to
        allocate_slots in the same step, before anything else allocates.
        """
        if not self.enable_prefix_caching or not request.use_prefix_cache:
            return [], 0
        assert request.num_computed_tokens == 0, "only a request without KV can look up the cache"
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, max_hit_blocks)
        block_ids: list[int] = []
        for block_hash in hashes[:max_hit_blocks]:
            block_id = self.block_pool.get_cached_block(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[int] | None = None
    ) -> list[int] | None:
        """Make the request's blocks cover num_computed_tokens + the hit blocks' tokens +
        num_new_tokens, and return the NEWLY allocated block ids (not the prefix-hit blocks,
        which are appended before them to the request's table; get_block_ids has the whole
        table). Returns None, changing nothing, when too few blocks are free.

        `new_computed_blocks` comes from get_computed_blocks for a request that holds no
        blocks yet; passing it (even empty) marks an admission, counted in prefix_cache_stats.
        """
        req_id = request.request_id
        block_size = self.block_size
        hit_blocks = new_computed_blocks or []
        blocks = self._req_to_blocks.get(req_id)
        num_held = len(blocks) if blocks is not None else 0
        assert not hit_blocks or (num_held == 0 and request.num_computed_tokens == 0), (
            "prefix-hit blocks can only start a request's block table"
        )
        num_total_tokens = request.num_computed_tokens + len(hit_blocks) * block_size + num_new_tokens
        assert num_total_tokens <= request.num_tokens_with_placeholders, (req_id, num_total_tokens, request.num_tokens)
        num_required = -(-num_total_tokens // block_size) - num_held - len(hit_blocks)
        num_required = max(num_required, 0)
        pool = self.block_pool
        # A hit on a free cached block takes it off the free list just like an allocation.
        num_revived = sum(1 for b in hit_blocks if pool.ref_count(b) == 0)
        if num_required + num_revived > pool.num_free_blocks:
            return None
        if blocks is None:
            blocks = self._req_to_blocks[req_id] = []
        if hit_blocks:
            # Touch before allocating, or the allocation could evict the very blocks hit.
            pool.touch(hit_blocks)
            blocks.extend(hit_blocks)
            self._num_cached_blocks[req_id] = len(hit_blocks)
        new_block_ids = pool.allocate(num_required)
        blocks.extend(new_block_ids)
        if new_computed_blocks is not None and self.enable_prefix_caching and request.use_prefix_cache:
            stats = self.prefix_cache_stats
            stats.num_requests += 1
            stats.num_query_tokens += request.num_tokens
            stats.num_hit_tokens += len(hit_blocks) * block_size
        return new_block_ids

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that are full of computed KV (the first
        num_computed_tokens // block_size), so later requests can share them. Call once the
        step that computes them is scheduled (workers run steps in order); output tokens count
        like prompt tokens once known."""
        if not self.enable_prefix_caching:
            return
        req_id = request.request_id
        blocks = self._req_to_blocks.get(req_id)
        if not blocks:
            return
        num_full = min(num_computed_tokens // self.block_size, len(blocks))
        start = self._num_cached_blocks.get(req_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(start, num_full):
            self.block_pool.cache_block(blocks[i], hashes[i])
        self._num_cached_blocks[req_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks, last block first, so that under memory pressure a
        sequence's tail is evicted before its head (heads are the most shared)."""
        req_id = request.request_id
        blocks = self._req_to_blocks.pop(req_id, None)
        self._req_to_hashes.pop(req_id, None)
        self._num_cached_blocks.pop(req_id, None)
        if blocks:
            self.block_pool.free(reversed(blocks))

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes; refused (False, with a warning) while blocks are in use."""
        if not self.block_pool.reset_prefix_cache():
            logger.warning(
                "Could not reset the prefix cache: %d of %d KV cache blocks are still in use.",
                self.num_blocks - self.num_free_blocks,
                self.num_blocks,
            )
            return False
        self.prefix_cache_stats = PrefixCacheStats()
        return True

    def _block_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """The hashes of the request's first num_blocks full blocks (computed once each)."""
        hashes = self._req_to_hashes.setdefault(request.request_id, [])
        num_blocks = min(num_blocks, request.num_tokens // self.block_size)
        if len(hashes) < num_blocks:
            block_size = self.block_size
            prompt, output = request.prompt_token_ids, request.output_token_ids
            num_prompt = len(prompt)
            parent = hashes[-1] if hashes else salted_root_hash(request.cache_salt)
            for i in range(len(hashes), num_blocks):
                start, end = i * block_size, (i + 1) * block_size
                if end <= num_prompt:
                    tokens = prompt[start:end]
                elif start >= num_prompt:
                    tokens = output[start - num_prompt : end - num_prompt]
                else:
                    tokens = prompt[start:] + output[: end - num_prompt]
                parent = hash_block_tokens(parent, tokens, _item_keys(request, start, end))
                hashes.append(parent)
        return hashes


def _item_keys(request: Request, start: int, end: int) -> list[str]:
    """Identifiers of the request's multi-modal items whose placeholders overlap [start, end)."""
    keys = []
    for feature in request.mm_features:
        offset, length = feature.placeholder.offset, feature.placeholder.length
        if offset < end and start < offset + length:
            keys.append(feature.identifier)
    return keys
