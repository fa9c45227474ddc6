"""The reference attention: plain torch, one request at a time. Used on CPU, and as the
ground truth the GPU kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.forward_context import AttentionMetadata


FP8_KV_DTYPE = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(FP8_KV_DTYPE).max)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """Keys/values as stored: fp8 caches hold x / scale (saturated to e4m3's range)."""
    if dtype != FP8_KV_DTYPE:
        return x.to(dtype)
    scaled = x.float() if scale is None else x.float() / scale
    return scaled.clamp(-_FP8_MAX, _FP8_MAX).to(dtype)


def from_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    if x.dtype != FP8_KV_DTYPE:
        return x.to(dtype)
    values = x.float() if scale is None else x.float() * scale
    return values.to(dtype)


def write_kv_cache(
    kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """Store each token's key/value at its flat slot (block_id * block_size + offset);
    slots of -1 (padding rows) are skipped. An fp8 cache stores them divided by k/v_scale."""
    num_kv_heads, head_size = kv_cache.shape[-2:]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    kv_cache[0].view(-1, num_kv_heads, head_size)[slots] = to_cache_dtype(key[valid], kv_cache.dtype, k_scale)
    kv_cache[1].view(-1, num_kv_heads, head_size)[slots] = to_cache_dtype(value[valid], kv_cache.dtype, v_scale)


def gather_kv(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, kv_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `kv_len` keys and values of a request, [kv_len, num_kv_heads, head_size],
    as stored (fp8 caches: still scaled)."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-kv_len // block_size)
    blocks = kv_cache[:, block_ids[:num_blocks].long()]
    blocks = blocks.flatten(1, 2)[:, :kv_len]
    return blocks[0], blocks[1]


def causal_mask(
    q_len: int, kv_len: int, sliding_window: int | None, device: torch.device,
    bidirectional_spans: list[tuple[int, int]] = (),
) -> torch.Tensor | None:
    """[q_len, kv_len] bool, True where query j (at position kv_len - q_len + j) may see the key;
    None when every query sees every key. Queries and keys inside one of `bidirectional_spans`
    ([start, end) positions) also see each other, as transformers' Gemma 3 masks compose it:
    (causal OR same span) AND within the window (the window bounds only the past)."""
    if sliding_window is None and q_len == 1 and not bidirectional_spans:
        return None
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    key_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    mask = key_pos <= query_pos
    for start, end in bidirectional_spans:
        mask |= (query_pos >= start) & (query_pos < end) & (key_pos >= start) & (key_pos < end)
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask


class TorchSDPAAttention:
    """Writes this step's keys/values into the paged cache, then runs
    scaled_dot_product_attention per request over its gathered keys/values."""

    name = "TORCH_SDPA"

    def __init__(self, sliding_window: int | None = None) -> None:
        self.sliding_window = sliding_window

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
    ) -> torch.Tensor:
        num_actual = attn_metadata.num_actual_tokens
        output = torch.zeros_like(query)
        if kv_cache is not None:
            write_kv_cache(
                kv_cache, key[:num_actual], value[:num_actual],
                attn_metadata.slot_mapping[:num_actual], k_scale, v_scale,
            )
        starts = attn_metadata.query_start_loc_cpu
        for i in range(attn_metadata.num_reqs):
            start, end = starts[i], starts[i + 1]
            q_len = end - start
            if q_len == 0 or start >= num_actual:
                continue  # an idle or padding request
            if kv_cache is None:
                # No cache yet (profiling): the request's tokens are its whole sequence.
                kv_len = q_len
                k, v = key[start:end], value[start:end]
            else:
                kv_len = attn_metadata.seq_lens_cpu[i]
                k, v = gather_kv(kv_cache, attn_metadata.block_table[i], kv_len)
                k = from_cache_dtype(k, query.dtype, k_scale)
                v = from_cache_dtype(v, query.dtype, v_scale)
            spans = attn_metadata.bidirectional_spans[i] if attn_metadata.bidirectional_spans else []
            output[start:end] = self._attend(query[start:end], k, v, kv_len, scale, spans)
        return output

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int, scale: float,
        bidirectional_spans: list[tuple[int, int]] = (),
    ) -> torch.Tensor:
        q_len = q.shape[0]
        # SDPA's is_causal aligns the mask top-left, right only when q_len == kv_len.
        use_is_causal = self.sliding_window is None and q_len == kv_len and q_len > 1 and not bidirectional_spans
        mask = None if use_is_causal else causal_mask(q_len, kv_len, self.sliding_window, q.device, bidirectional_spans)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.to(q.dtype).transpose(0, 1).unsqueeze(0),
            v.to(q.dtype).transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=use_is_causal,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return out.squeeze(0).transpose(0, 1)
