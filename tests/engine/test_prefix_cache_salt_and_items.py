"""Both cache_salt and the multi-modal items' content hashes feed the prefix cache's block
hashes: the same tokens hit only under the same salt and the same images. No torch."""

from __future__ import annotations

from pagedllm.engine.kv_cache_manager import KVCacheManager
from pagedllm.engine.request import Request
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.multimodal.inputs import MultiModalFeature, PlaceholderRange

BLOCK_SIZE = 4
PROMPT = list(range(100, 117))  # 17 tokens: 4 full blocks can hit


def _request(req_id: str, salt: str | None, image_hash: str) -> Request:
    request = Request(req_id, list(PROMPT), SamplingParams(max_tokens=1), None, 1, cache_salt=salt)
    request.mm_features = [MultiModalFeature("image", image_hash, {}, PlaceholderRange(5, 6))]
    return request


def _num_hit_tokens(salt: str | None, image_hash: str) -> int:
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    first = _request("first", "salt-a", "image-1")
    kv.allocate_slots(first, first.num_tokens, kv.get_computed_blocks(first)[0])
    kv.cache_full_blocks(first, first.num_tokens)
    return kv.get_computed_blocks(_request("second", salt, image_hash))[1]


def test_same_salt_and_same_image_hit_every_full_block():
    assert _num_hit_tokens("salt-a", "image-1") == 16


def test_another_image_at_the_same_placeholders_misses_from_its_first_block():
    # The image starts in block 1 (positions 5-10): block 0 is pure text and still hits.
    assert _num_hit_tokens("salt-a", "image-2") == BLOCK_SIZE


def test_another_salt_misses_even_with_the_same_image():
    assert _num_hit_tokens("salt-b", "image-1") == 0
    assert _num_hit_tokens(None, "image-1") == 0
