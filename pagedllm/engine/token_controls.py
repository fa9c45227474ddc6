"""Checks and prepares a request's token controls (logit_bias, allowed_token_ids, bad_words,
structured outputs) against the model's vocabulary, before any work starts."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from pagedllm.engine.sampling_params import SamplingParams


def validate_token_controls(
    params: SamplingParams, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int
) -> None:
    """ValueError naming the field when an id is outside the vocabulary; tokenizes bad_words."""
    for name in ("allowed_token_ids", "logit_bias"):
        ids = getattr(params, name)
        bad = [t for t in (ids or ()) if t >= vocab_size]
        if bad:
            raise ValueError(
                f"SamplingParams.{name} has token id {bad[0]} outside the vocabulary (0..{vocab_size - 1})."
            )
    # Tokenized for this engine's tokenizer every time: the same params may serve two models.
    if params.bad_words:
        if tokenizer is None:
            raise ValueError("SamplingParams.bad_words needs a tokenizer; pass bad token ids through logit_bias instead.")
        params.bad_words_token_ids = tokenize_bad_words(params.bad_words, tokenizer)
        bad = [t for ids in params.bad_words_token_ids for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.bad_words tokenize to id {bad[0]} outside the vocabulary.")


def tokenize_bad_words(bad_words: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each word as it would appear at the start of the text and after a space (vLLM's rule:
    the spaced form is added only when it is a different first token of the same length)."""
    sequences: list[list[int]] = []
    for word in bad_words:
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if bare:
            sequences.append(bare)
        if spaced and bare and spaced[0] != bare[0] and len(spaced) == len(bare):
            sequences.append(spaced)
    return sequences
