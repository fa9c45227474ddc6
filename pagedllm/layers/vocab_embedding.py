"""Token embedding and LM head, split by vocabulary rows across ranks.

The vocabulary is padded to a multiple of 64 * tensor_parallel_size, so every rank holds a
contiguous, equally sized block of rows and all padding sits at the end of the last blocks
(LogitsProcessor cuts it off after gathering).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.communication import tensor_model_parallel_all_reduce
from pagedllm.distributed.parallel_state import get_tp_rank, get_tp_size
from pagedllm.layers.quantization.base import (
    LoadedWeight,
    copy_loaded_weight,
    loaded_shape,
    narrow_loaded_weight,
    set_weight_attrs,
)

# Row-count multiple of each rank's shard: keeps matmul shapes friendly to GPU kernels.
VOCAB_PADDING_SIZE = 64


def pad_vocab_size(vocab_size: int, tp_size: int) -> int:
    multiple = VOCAB_PADDING_SIZE * tp_size
    return -(-vocab_size // multiple) * multiple


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.prefix = prefix
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = nn.Parameter(
            torch.empty(
                self.num_embeddings_per_partition, embedding_dim,
                dtype=params_dtype or torch.get_default_dtype(),
            ),
            requires_grad=False,
        )
        set_weight_attrs(self.weight, {"output_dim": 0, "weight_loader": self.weight_loader})

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        shape = loaded_shape(loaded)
        if shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"Checkpoint tensor for {self.prefix} has shape {shape} but the config says "
                f"vocab_size={self.num_embeddings}, hidden_size={self.embedding_dim}."
            )
        self._load_rows(param, loaded, self.prefix)

    def _load_rows(self, param: nn.Parameter, loaded: LoadedWeight, name: str) -> None:
        """Copies this rank's vocabulary rows; the padding rows past the real vocabulary stay
        zero."""
        num_real = max(0, min(self.vocab_end_index, self.num_embeddings) - self.vocab_start_index)
        param.data.zero_()
        if num_real:
            copy_loaded_weight(
                param.data[:num_real], narrow_loaded_weight(loaded, 0, self.vocab_start_index, num_real), name
            )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index) * in_shard
        out = F.embedding(local_ids, self.weight) * in_shard.unsqueeze(-1).to(self.weight.dtype)
        return tensor_model_parallel_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection; its logits are computed by LogitsProcessor, not by forward."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, bias: bool = False,
        params_dtype: torch.dtype | None = None, prefix: str = "",
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, params_dtype, prefix)
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.num_embeddings_per_partition, dtype=self.weight.dtype),
                requires_grad=False,
            )
            set_weight_attrs(self.bias, {"output_dim": 0, "weight_loader": self._bias_loader})
        else:
            self.register_parameter("bias", None)

    def _bias_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: object = None) -> None:
        self._load_rows(param, loaded, f"{self.prefix}.bias")

    def tie_weights(self, embed_tokens: VocabParallelEmbedding) -> None:
        """Share the embedding's weight (tie_word_embeddings); checkpoints then omit lm_head."""
        self.weight = embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead has no forward; compute logits with LogitsProcessor.")
