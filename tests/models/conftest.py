"""Shared helpers for model tests: building the AttentionMetadata of one step by hand, the
way the model runner does."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from pagedllm.forward_context import AttentionMetadata


def build_attn_metadata(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]] | None,
    block_size: int,
    device: torch.device | str = "cpu",
    num_padding_tokens: int = 0,
) -> AttentionMetadata:
    """Metadata for requests that each run their last query_lens[i] tokens of seq_lens[i].
    Without block tables (no KV cache yet) every slot is -1; padding rows get slot -1."""
    query_start_loc = [0]
    for query_len in query_lens:
        query_start_loc.append(query_start_loc[-1] + query_len)
    slots: list[int] = []
    for i, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        for pos in range(seq_len - query_len, seq_len):
            if block_tables is None:
                slots.append(-1)
            else:
                block = block_tables[i][pos // block_size]
                slots.append(block * block_size + pos % block_size)
    slots += [-1] * num_padding_tokens
    width = max((len(t) for t in block_tables), default=1) if block_tables else 1
    table = torch.zeros(len(query_lens), width, dtype=torch.int32)
    for i, blocks in enumerate(block_tables or []):
        table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return AttentionMetadata(
        num_actual_tokens=query_start_loc[-1],
        num_reqs=len(query_lens),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
        block_table=table.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=list(seq_lens),
    )


@pytest.fixture
def make_attn_metadata() -> Callable[..., AttentionMetadata]:
    """make_attn_metadata(query_lens, seq_lens, block_tables, block_size, device)."""
    return build_attn_metadata
