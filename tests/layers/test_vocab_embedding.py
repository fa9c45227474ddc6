"""Vocabulary-parallel embedding and LM head, checked without processes: per-rank pieces are
built under a fake rank/size, the collectives replaced by summing / concatenating them by hand,
and the result compared with the unsplit computation (exact for the embedding, 1e-5 logits)."""

from __future__ import annotations

import pytest
import torch

import pagedllm.layers.logits_processor as logits_module
import pagedllm.layers.vocab_embedding as vocab_module
from pagedllm.distributed.parallel_state import override_tp_state_for_testing
from pagedllm.layers.logits_processor import LogitsProcessor
from pagedllm.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding

VOCAB, DIM = 100, 8


def per_rank(cls: type, tp_size: int, weight: torch.Tensor) -> list:
    layers = []
    for rank in range(tp_size):
        with override_tp_state_for_testing(rank, tp_size):
            layer = cls(VOCAB, DIM)
        layer.weight.weight_loader(layer.weight, weight)
        layers.append(layer)
    return layers


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_masked_rank_embeddings_sum_to_the_full_lookup(tp_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vocab_module, "tensor_model_parallel_all_reduce", lambda x: x)
    weight = torch.randn(VOCAB, DIM)
    layers = per_rank(VocabParallelEmbedding, tp_size, weight)
    assert all(layer.weight.shape[0] * tp_size % 64 == 0 for layer in layers)
    ids = torch.tensor([0, 5, 63, 64, 99, 37])
    total = sum(layer(ids) for layer in layers)
    assert torch.equal(total, weight[ids])


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_gathered_logits_drop_vocab_padding(tp_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    weight, hidden = torch.randn(VOCAB, DIM), torch.randn(3, DIM)
    heads = per_rank(ParallelLMHead, tp_size, weight)
    # Stand-in for all_gather: every rank's partial logits, in rank order.
    monkeypatch.setattr(
        logits_module, "tensor_model_parallel_all_gather",
        lambda x, dim=-1: torch.cat([hidden @ head.weight.T for head in heads], dim=dim),
    )
    logits = LogitsProcessor(VOCAB)(heads[0], hidden)
    assert logits.shape == (3, VOCAB)
    torch.testing.assert_close(logits, hidden @ weight.T, atol=1e-5, rtol=0)


def test_tied_lm_head_shares_the_embedding_parameter() -> None:
    embed, head = VocabParallelEmbedding(VOCAB, DIM), ParallelLMHead(VOCAB, DIM)
    head.tie_weights(embed)
    assert head.weight is embed.weight


def test_checkpoint_with_wrong_vocab_size_is_rejected() -> None:
    embed = VocabParallelEmbedding(VOCAB, DIM, prefix="model.embed_tokens")
    with pytest.raises(ValueError, match=r"model\.embed_tokens.*vocab_size=100"):
        embed.weight.weight_loader(embed.weight, torch.randn(VOCAB + 1, DIM))
