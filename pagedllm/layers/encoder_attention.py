"""Full (non-causal) attention over packed variable-length sequences, for vision encoders.

Encoders see each image (or window of one) as its own sequence: no KV cache, no paging, no
causal mask, so torch's SDPA over each segment is the whole job (it picks flash / memory-
efficient kernels on GPU). Shared by every vision family.
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
    out = torch.empty_like(query)
    bounds = list(cu_seqlens)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        q = query[start:end].transpose(0, 1).unsqueeze(0)
        k = key[start:end].transpose(0, 1).unsqueeze(0)
        v = value[start:end].transpose(0, 1).unsqueeze(0)
        attended = F.scaled_dot_product_attention(q, k, v, scale=scale)
        out[start:end] = attended.squeeze(0).transpose(0, 1)
    return out.reshape(num_tokens, -1)
