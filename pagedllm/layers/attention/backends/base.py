"""The attention-backend seam: one implementation is chosen per engine (device, dtype)."""

from __future__ import annotations

from typing import Protocol

import torch

from pagedllm.forward_context import AttentionMetadata


class AttentionImpl(Protocol):
    """Computes attention for a flat batch of tokens over a paged KV cache.

    Shapes: query [num_tokens, num_heads, head_size]; key and value
    [num_tokens, num_kv_heads, head_size]; kv_cache [2, num_blocks, block_size, num_kv_heads,
    head_size] or None before the cache exists. Returns [num_tokens, num_heads, head_size].
    The implementation first writes key/value into kv_cache at attn_metadata.slot_mapping
    (skipping -1), then attends causally: the query token at row j of request i sits at
    position seq_lens[i] - query_len_i + (j - query_start_loc[i]) and sees keys 0..position.
    A float8_e4m3fn kv_cache stores key / k_scale and value / v_scale (scalar float32 tensors).
    """

    name: str

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor | None,
        attn_metadata: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor: ...
