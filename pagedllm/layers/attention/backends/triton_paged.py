"""GPU attention backend: our own Triton kernels over the paged KV cache.

One call handles a mixed batch: new K/V are scattered into the cache, prefill chunks (query
length > 1, with or without history) go through a flash-attention kernel that reads K/V from
the cache pages, and decode rows (query length 1) through a split-K kernel whose grid does not
depend on sequence lengths. In a decode-only step (every CUDA-graph step) the split-K kernel
writes the new K/V itself: one launch per layer instead of two.

Host-side values of AttentionMetadata that this backend reads, and what for:
- num_reqs: sizes every kernel's grid (under CUDA graphs: the padded batch size;
  padded requests must have query length 0 or 1 and a seq_len >= 0 with valid block ids).
- max_query_len: == 1 selects the decode-only path (the only one meant for CUDA graphs).
- num_actual_tokens: rows past it are padding; their output is zeroed.
seq_lens_cpu, query_start_loc_cpu and max_seq_len are never read, so no kernel's grid depends
on a sequence length. The decode grid is (num_reqs, num_kv_heads, num_splits) with num_splits
from choose_num_splits(num_reqs, num_kv_heads, num_sms): static for a given padded batch size.

Also supported: sliding-window attention (constructor argument, as the Attention layer passes
it), head sizes 16..256 (padded to a power of two inside the kernels), fp16/bf16/fp32, any
power-of-two block size, a float8_e4m3fn cache (kv_cache_dtype="fp8", dequantized with the
layer's k_scale / v_scale inside the kernels), and an optional preallocated `output` (a static buffer under graphs).
The ops modules import triton, so import this module only where a CUDA backend is wanted.
"""

from __future__ import annotations

import torch

from pagedllm.forward_context import AttentionMetadata
from pagedllm.layers.attention.backends.torch_sdpa import TorchSDPAAttention
from pagedllm.layers.attention.ops.decode_attention import MAX_NUM_SPLITS, choose_num_splits, paged_decode_attention
from pagedllm.layers.attention.ops.prefill_attention import paged_prefill_attention
from pagedllm.layers.attention.ops.reshape_and_cache import reshape_and_cache
from pagedllm.layers.ops import num_sms

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_SIZE = 256
# tl.dot needs an inner dimension of at least 16.
MIN_HEAD_SIZE = 16
# (request, KV head) pairs whose decode splits can merge themselves; splits > 1 only happen
# below 2 x num_sms pairs (choose_num_splits), so larger batches never need more.
_SPLIT_COUNTER_SLOTS = 4096


class TritonPagedAttention:
    """AttentionImpl for CUDA devices (see backends/base.py for the contract)."""

    name = "TRITON_PAGED"

    def __init__(self, sliding_window: int | None = None, max_decode_splits: int = MAX_NUM_SPLITS) -> None:
        """sliding_window: each query sees only its last sliding_window keys (itself included);
        None for full causal attention. max_decode_splits: upper bound (a power of two) on how
        many programs share one decode request's context; 1 disables split-K."""
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be None or a positive number of tokens, got {sliding_window}.")
        if max_decode_splits < 1 or max_decode_splits & (max_decode_splits - 1):
            raise ValueError(
                f"max_decode_splits must be a power of two >= 1 (e.g. {MAX_NUM_SPLITS}), got {max_decode_splits}."
            )
        self.sliding_window = sliding_window
        self.max_decode_splits = max_decode_splits
        self._split_counters: dict[torch.device, torch.Tensor] = {}

    def num_decode_splits(self, num_reqs: int, num_kv_heads: int, device: torch.device) -> int:
        """Splits used for a decode batch of num_reqs (padded) requests on device."""
        return choose_num_splits(num_reqs, num_kv_heads, num_sms(device), self.max_decode_splits)

    def split_counters(self, device: torch.device) -> torch.Tensor:
        """The decode splits' arrival counters on device (zeroed once; the kernel leaves them zeroed)."""
        if device not in self._split_counters:
            self._split_counters[device] = torch.zeros(_SPLIT_COUNTER_SLOTS, dtype=torch.int32, device=device)
        return self._split_counters[device]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor | None,
        attn_metadata: AttentionMetadata,
        scale: float,
        output: torch.Tensor | None = None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See AttentionImpl. output, if given, is a contiguous [T, H, D] tensor of query's
        dtype that receives the result (a static buffer under CUDA graphs); it is returned."""
        _check_inputs(query, key, value, kv_cache)
        if attn_metadata.bidirectional_spans and any(attn_metadata.bidirectional_spans):
            # Gemma 3 image prefill (tokens of one image see each other): the kernels only know
            # causal masks, so these steps (never captured in CUDA graphs) take the reference path.
            result = TorchSDPAAttention(self.sliding_window).forward(
                query, key, value, kv_cache, attn_metadata, scale, k_scale=k_scale, v_scale=v_scale
            )
            if output is None:
                return result
            output.copy_(result)
            return output
        if query.stride(-1) != 1:
            query = query.contiguous()
        num_tokens = query.shape[0]
        md = attn_metadata
        if output is None:
            out = torch.empty_like(query, memory_format=torch.contiguous_format)
        elif output.shape != query.shape or output.dtype != query.dtype or not output.is_contiguous():
            raise ValueError(
                f"output must be a contiguous {query.dtype} tensor of shape {tuple(query.shape)}; got "
                f"{output.dtype} {tuple(output.shape)}."
            )
        else:
            out = output
        if num_tokens == 0:
            return out
        if kv_cache is None:
            # Profiling run: no cache, every request attends causally to its fresh tokens.
            paged_prefill_attention(
                out, query, key, value, md.block_table, md.query_start_loc, md.seq_lens, md.num_reqs,
                scale, kv_from_cache=False, skip_decode=False, sliding_window=self.sliding_window,
            )
        else:
            decode_only = md.max_query_len == 1
            if not decode_only:
                # A decode-only step's keys and values are written by the decode kernel.
                reshape_and_cache(key, value, kv_cache, md.slot_mapping, k_scale, v_scale)
            if md.max_query_len > 1:
                # With one request there is no decode row to hand over; otherwise the split-K
                # kernel below takes the query-length-1 rows, whichever they are.
                mixed = md.num_reqs > 1
                paged_prefill_attention(
                    out, query, kv_cache[0], kv_cache[1], md.block_table, md.query_start_loc, md.seq_lens,
                    md.num_reqs, scale, kv_from_cache=True, skip_decode=mixed, sliding_window=self.sliding_window,
                    k_scale=k_scale, v_scale=v_scale,
                )
            if md.max_query_len == 1 or md.num_reqs > 1:
                num_splits = self.num_decode_splits(md.num_reqs, kv_cache.shape[3], query.device)
                paged_decode_attention(
                    out, query, kv_cache, md.block_table, md.query_start_loc, md.seq_lens, md.num_reqs,
                    scale, num_splits, sliding_window=self.sliding_window, k_scale=k_scale, v_scale=v_scale,
                    split_counters=self.split_counters(query.device),
                    new_kv=(key, value, md.slot_mapping), write_new_kv=decode_only,
                )
        if md.num_actual_tokens < num_tokens:
            out[md.num_actual_tokens :].zero_()
        return out


def _check_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor | None
) -> None:
    if query.dim() != 3 or key.dim() != 3 or value.shape != key.shape:
        raise ValueError(
            f"TRITON_PAGED expects query [T, H, D] and key/value [T, Hkv, D]; got query "
            f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}."
        )
    num_heads, head_size = query.shape[1], query.shape[2]
    num_kv_heads = key.shape[1]
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"TRITON_PAGED supports dtypes {SUPPORTED_DTYPES}, got {query.dtype}.")
    if not MIN_HEAD_SIZE <= head_size <= MAX_HEAD_SIZE:
        raise ValueError(
            f"TRITON_PAGED supports head_size {MIN_HEAD_SIZE}..{MAX_HEAD_SIZE}, got {head_size}; "
            "use the TORCH_SDPA backend for this model."
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}).")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("TRITON_PAGED needs key/value with a contiguous last (head_size) dimension.")
    if kv_cache is not None:
        expected = (2, num_kv_heads, head_size)
        got = (kv_cache.shape[0], kv_cache.shape[3], kv_cache.shape[4]) if kv_cache.dim() == 5 else None
        if got != expected or kv_cache.stride(-1) != 1:
            raise ValueError(
                f"kv_cache must be [2, num_blocks, block_size, {num_kv_heads}, {head_size}] with a contiguous "
                f"last dimension; got shape {tuple(kv_cache.shape)}."
            )
        block_size = kv_cache.shape[2]
        if block_size & (block_size - 1):
            raise ValueError(f"kv_cache block_size must be a power of two (e.g. 16), got {block_size}.")
