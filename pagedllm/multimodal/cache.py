"""The processed-input cache: a repeated image (same bytes, or the same uuid, with the same
processor kwargs) is not run through the processor again. Bounded in bytes
(mm_processor_cache_gb, else PAGEDLLM_MM_INPUT_CACHE_GIB), least recently used entries
evicted first; 0 bytes turns it off."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def hash_item(modality: str, item: Any, processor_kwargs: Mapping[str, Any]) -> str:
    """sha256 over the modality, the item's pixels (mode and size included) and the kwargs."""
    digest = hashlib.sha256(modality.encode())
    digest.update(json.dumps(dict(processor_kwargs), sort_keys=True, default=str).encode())
    _update_with(digest, item)
    return digest.hexdigest()


def item_key(modality: str, item: Any, uuid: str | None, processor_kwargs: Mapping[str, Any]) -> str:
    """The item's cache key: its uuid from multi_modal_uuids when given (the item's content
    is then never hashed), else its content hash. As vLLM does, a uuid is mixed with the
    processor kwargs when there are any, since other kwargs make another processed item."""
    if uuid is None:
        return hash_item(modality, item, processor_kwargs)
    if not processor_kwargs:
        return uuid
    digest = hashlib.sha256(f"uuid:{modality}".encode())
    digest.update(json.dumps(dict(processor_kwargs), sort_keys=True, default=str).encode())
    digest.update(uuid.encode())
    return digest.hexdigest()


def _update_with(digest: Any, item: Any) -> None:
    if hasattr(item, "tobytes") and hasattr(item, "mode") and hasattr(item, "size"):  # PIL image
        digest.update(f"pil:{item.mode}:{item.size}".encode())
        digest.update(item.tobytes())
    elif isinstance(item, torch.Tensor):
        digest.update(f"tensor:{item.dtype}:{tuple(item.shape)}".encode())
        digest.update(item.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    elif isinstance(item, np.ndarray):
        digest.update(f"array:{item.dtype}:{item.shape}".encode())
        digest.update(np.ascontiguousarray(item).tobytes())
    elif isinstance(item, (list, tuple)):
        digest.update(f"seq:{len(item)}".encode())
        for element in item:
            _update_with(digest, element)
    elif isinstance(item, (bytes, str, int, float)):
        digest.update(repr(item).encode())
    else:
        raise TypeError(
            f"A multi-modal item must be a PIL image, a numpy array, a torch tensor, or a list of "
            f"those (video frames), got {type(item).__name__}."
        )


def nbytes_of(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, Mapping):
        return sum(nbytes_of(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes_of(v) for v in value)
    if hasattr(value, "data") and hasattr(value, "extra"):  # a ProcessedItem
        return nbytes_of(value.data)
    return 0


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class ProcessedInputCache:
    """LRU map from item hash to processed item, never holding more than `capacity_bytes`
    (an item larger than the whole bound is simply not kept)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.num_bytes = 0
        self.stats = CacheStats()
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[0]

    def put(self, key: str, value: Any) -> None:
        size = nbytes_of(value)
        if size > self.capacity_bytes or key in self._entries:
            return
        while self.num_bytes + size > self.capacity_bytes:
            _, (_, evicted_size) = self._entries.popitem(last=False)
            self.num_bytes -= evicted_size
            self.stats.evictions += 1
        self._entries[key] = (value, size)
        self.num_bytes += size
