"""Full (non-causal) attention over packed variable-length sequences, for vision encoders.

Encoders see each image (or window of one) as its own sequence: no KV cache, no paging, no
causal mask, so torch's SDPA is the whole job (it picks flash / memory-efficient kernels on
GPU). Sequences of equal length run as one batched SDPA call: Qwen2.5-VL's windows are
mostly the same size, and one call per window would be hundreds of tiny kernels per image.
Shared by every vision family.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def varlen_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: Sequence[int], scale: float
) -> torch.Tensor:
    """query/key/value [T, num_heads, head_dim] holding sequences [cu_seqlens[i],
    cu_seqlens[i+1]); returns [T, num_heads * head_dim], each token attending over its own
    sequence only."""
    num_tokens = query.shape[0]
    bounds = torch.as_tensor(list(cu_seqlens), dtype=torch.int64)
    starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
    covers_all = int(bounds[0]) == 0 and int(bounds[-1]) == num_tokens
    if covers_all and bool((lengths == lengths[0]).all()) and int(lengths[0]) > 0:
        # One length: a plain reshape, no gather.
        length = int(lengths[0])
        batched = [t.view(-1, length, *t.shape[1:]).transpose(1, 2) for t in (query, key, value)]
        out = F.scaled_dot_product_attention(*batched, scale=scale)
        return out.transpose(1, 2).reshape(num_tokens, -1)
    out = torch.empty_like(query)
    for length in lengths.unique().tolist():
        if length == 0:
            continue
        index = (starts[lengths == length][:, None] + torch.arange(length)).to(query.device)  # [n, length]
        batched = [t[index].transpose(1, 2) for t in (query, key, value)]  # [n, heads, length, dim]
        out[index] = F.scaled_dot_product_attention(*batched, scale=scale).transpose(1, 2)
    return out.reshape(num_tokens, -1)
