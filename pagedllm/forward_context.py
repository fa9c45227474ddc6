"""Per-step attention metadata, set by the model runner and read by every Attention layer.

This is the one piece of module-level state in the package: it is only ever set through the
`set_forward_context` context manager, which restores the previous value on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """What attention needs for one step over a flat batch of tokens from many requests.

    Tokens of request i are rows query_start_loc[i]:query_start_loc[i+1] of the batch; they
    are the last (query_start_loc[i+1] - query_start_loc[i]) tokens of a sequence of
    seq_lens[i] tokens whose KV lives in the blocks block_table[i, :]. Rows past
    num_actual_tokens are padding (CUDA graphs) and have slot_mapping -1.

    Before the KV cache exists (the profiling run) layers have no cache bound; attention is
    then causal self-attention within each request, and every seq_len equals its query length.
    """

    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    """[num_reqs + 1] int32, on the model's device."""
    seq_lens: torch.Tensor
    """[num_reqs] int32: KV length of each request including this step's tokens."""
    block_table: torch.Tensor
    """[num_reqs, max_blocks_per_req] int32: physical block ids, padded with 0."""
    slot_mapping: torch.Tensor
    """[num_tokens] int64: flat slot (block_id * block_size + offset) where each token's K/V
    is written; -1 for padding rows."""
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    bidirectional_spans: list[list[tuple[int, int]]] | None = None
    """Per request, [start, end) sequence positions whose tokens also see each other (not only
    earlier ones): Gemma 3's image tokens. Set only for prefill steps that hold such tokens;
    None everywhere else (then attention is causal)."""


@dataclass(slots=True)
class ForwardContext:
    attn_metadata: AttentionMetadata


_forward_context: ForwardContext | None = None


@contextlib.contextmanager
def set_forward_context(attn_metadata: AttentionMetadata) -> Iterator[ForwardContext]:
    global _forward_context
    previous = _forward_context
    _forward_context = ForwardContext(attn_metadata=attn_metadata)
    try:
        yield _forward_context
    finally:
        _forward_context = previous


def get_forward_context() -> ForwardContext:
    if _forward_context is None:
        raise RuntimeError("No forward context: run the model inside set_forward_context().")
    return _forward_context
