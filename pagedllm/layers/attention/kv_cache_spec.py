"""What one attention layer needs from the KV cache, declared by the layer itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_kv_heads: int
    """Key/value heads held by this rank."""
    head_size: int
    """Features per head."""
    dtype: torch.dtype
    """Dtype of the cached keys and values."""
    sliding_window: int | None = None
    """Tokens a query looks back over (itself included), or None for full attention."""

    def page_size_bytes(self, block_size: int) -> int:
        """Bytes of one block: keys and values of `block_size` tokens."""
        return 2 * block_size * self.num_kv_heads * self.head_size * self.dtype.itemsize
