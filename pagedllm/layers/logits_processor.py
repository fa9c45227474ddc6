"""Hidden states → logits over the real vocabulary."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.distributed.communication import tensor_model_parallel_all_gather
from pagedllm.layers.ops import dense_linear
from pagedllm.layers.vocab_embedding import VocabParallelEmbedding


class LogitsProcessor(nn.Module):
    """`hidden @ lm_head.weight.T`, gathered over ranks, padding rows cut off.

    `scale` multiplies the logits (some families' `logit_scale`); `soft_cap` applies
    `soft_cap * tanh(logits / soft_cap)` (Gemma 2's final_logit_softcapping).
    """

    def __init__(self, vocab_size: int, scale: float = 1.0, soft_cap: float | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.scale = scale
        self.soft_cap = soft_cap

    def forward(self, lm_head: VocabParallelEmbedding, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] → [num_tokens, vocab_size], in the hidden states' dtype."""
        logits = dense_linear(hidden_states, lm_head.weight, getattr(lm_head, "bias", None))
        logits = tensor_model_parallel_all_gather(logits, dim=-1)
        # Padding rows are the last ones (each rank holds a contiguous block, in rank order).
        logits = logits[..., : self.vocab_size]
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        if self.scale != 1.0:
            logits = logits * self.scale
        return logits
