"""Per-step sampling inputs: the sampling parameters of the rows that sample this step,
turned into tensors once (one host-to-device copy per kind of data)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch

from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.layers.token_controls import TokenControls, build_token_controls


@dataclass(slots=True)
class SamplingMetadata:
    """What the sampler needs about the rows of one step. A tensor that no row needs is None,
    so the hot path skips that work; greedy rows carry neutral top-k/top-p/min-p values."""

    all_greedy: bool
    all_random: bool
    is_greedy: torch.Tensor | None
    """bool [rows]; None when all rows are greedy or all are random."""
    temperature: torch.Tensor | None
    """float32 [rows], 1.0 on greedy rows; None when all rows are greedy."""
    top_k: torch.Tensor | None
    """int64 [rows], 0 = disabled for that row."""
    max_top_k: int
    top_k_on_every_row: bool
    """No row has top-k disabled (lets top-p sort only the top-k candidates)."""
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    presence_penalties: torch.Tensor | None
    frequency_penalties: torch.Tensor | None
    repetition_penalties: torch.Tensor | None
    prompt_token_mask: torch.Tensor | None
    """bool [rows, vocab]: the token occurs in the prompt (only for repetition penalties)."""
    output_token_counts: torch.Tensor | None
    """float32 [rows, vocab]: occurrences in the output so far (only when a penalty is on)."""
    banned_token_index: torch.Tensor | None
    """int64 [2, n]: (row, token id) pairs that min_tokens forbids this step."""
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    """Random rows that sample from their own generator."""
    default_generator: torch.Generator | None = None
    num_logprobs: list[int | None] = field(default_factory=list)
    """Per row: top tokens to return besides the sampled one (-1 resolved to the vocab size)."""
    max_num_logprobs: int | None = None
    token_controls: TokenControls | None = None
    """logit_bias, allowed_token_ids, bad_words and logits processors of the rows that set them."""
    grammar_bitmask: torch.Tensor | None = None
    """int32 [rows, words]: structured-output token masks (-1 rows are unconstrained)."""

    @property
    def no_top_k(self) -> bool:
        return self.top_k is None

    @property
    def no_top_p(self) -> bool:
        return self.top_p is None

    @property
    def no_min_p(self) -> bool:
        return self.min_p is None

    @property
    def no_penalties(self) -> bool:
        return self.output_token_counts is None

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        generators: list[torch.Generator | None],
        default_generator: torch.Generator | None,
        eos_token_id: int | None,
        vocab_size: int,
        device: torch.device,
        extra_eos_token_ids: frozenset[int] = frozenset(),
    ) -> SamplingMetadata:
        num_rows = len(params)
        if not (len(prompt_token_ids) == len(output_token_ids) == len(generators) == num_rows):
            raise ValueError(
                "SamplingMetadata.build needs one entry per row in params, prompt_token_ids, "
                f"output_token_ids and generators; got {num_rows}, {len(prompt_token_ids)}, "
                f"{len(output_token_ids)} and {len(generators)}."
            )
        greedy = [p.greedy for p in params]
        random_rows = [p for p, g in zip(params, greedy) if not g]
        all_greedy = not random_rows
        all_random = len(random_rows) == num_rows

        use_top_k = any(p.top_k > 0 for p in random_rows)
        use_top_p = any(p.top_p < 1.0 for p in random_rows)
        use_min_p = any(p.min_p > 0.0 for p in random_rows)
        use_repetition = any(p.repetition_penalty != 1.0 for p in params)
        use_penalties = use_repetition or any(
            p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params
        )

        # Every per-row float travels in one [7, rows] tensor: one host-to-device copy.
        scalars = [
            [float(g) for g in greedy],
            [1.0 if g else p.temperature for p, g in zip(params, greedy)],
            [1.0 if g else p.top_p for p, g in zip(params, greedy)],
            [0.0 if g else p.min_p for p, g in zip(params, greedy)],
            [p.presence_penalty for p in params],
            [p.frequency_penalty for p in params],
            [p.repetition_penalty for p in params],
        ]
        (is_greedy, temperature, top_p, min_p, presence, frequency, repetition) = _to_device(
            scalars, torch.float32, device
        ).unbind(0)

        top_k = None
        max_top_k = 0
        top_k_on_every_row = False
        if use_top_k:
            # Greedy rows get top_k=1 so that "every row has a top-k" stays true for them;
            # their argmax replaces whatever the random path picks.
            ks = [1 if g else min(p.top_k, vocab_size) for p, g in zip(params, greedy)]
            max_top_k = max(ks)
            top_k_on_every_row = min(ks) > 0
            top_k = _to_device(ks, torch.int64, device)

        prompt_mask = None
        output_counts = None
        if use_penalties:
            output_counts = _token_counts(output_token_ids, vocab_size, device)
            if use_repetition:
                prompt_mask = _token_counts(prompt_token_ids, vocab_size, device) > 0

        banned_rows: list[int] = []
        banned_tokens: list[int] = []
        for row, (p, output) in enumerate(zip(params, output_token_ids)):
            if len(output) >= p.min_tokens:
                continue
            # With ignore_eos, EOS does not end the request, so there is nothing to ban.
            stop_ids = set(p.stop_token_ids or ())
            if eos_token_id is not None and not p.ignore_eos:
                stop_ids.add(eos_token_id)
            if not p.ignore_eos:
                stop_ids.update(extra_eos_token_ids)
            stop_ids = {t for t in stop_ids if t < vocab_size}
            banned_rows.extend([row] * len(stop_ids))
            banned_tokens.extend(stop_ids)
        banned = _to_device([banned_rows, banned_tokens], torch.int64, device) if banned_rows else None

        num_logprobs = [
            None if p.logprobs is None else (vocab_size if p.logprobs == -1 else min(p.logprobs, vocab_size))
            for p in params
        ]
        requested = [k for k in num_logprobs if k is not None]

        return cls(
            all_greedy=all_greedy,
            all_random=all_random,
            is_greedy=None if all_greedy or all_random else is_greedy > 0.5,
            temperature=None if all_greedy else temperature,
            top_k=top_k,
            max_top_k=max_top_k,
            top_k_on_every_row=top_k_on_every_row,
            top_p=top_p if use_top_p else None,
            min_p=min_p if use_min_p else None,
            presence_penalties=presence if use_penalties else None,
            frequency_penalties=frequency if use_penalties else None,
            repetition_penalties=repetition if use_penalties else None,
            prompt_token_mask=prompt_mask,
            output_token_counts=output_counts,
            banned_token_index=banned,
            generators={row: g for row, g in enumerate(generators) if g is not None and not greedy[row]},
            default_generator=default_generator,
            num_logprobs=num_logprobs,
            max_num_logprobs=max(requested) if requested else None,
            token_controls=build_token_controls(params, prompt_token_ids, output_token_ids, vocab_size, device),
        )


def _to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Pinned staging memory lets the copy run asynchronously on CUDA; the caching host
    # allocator keeps the buffer alive until the copy has finished.
    pin = device.type == "cuda"
    return torch.tensor(data, dtype=dtype, pin_memory=pin).to(device, non_blocking=pin)


def _token_counts(token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """float32 [rows, vocab]: how often each token occurs in each row's list."""
    num_rows = len(token_ids)
    lengths = [len(ids) for ids in token_ids]
    total = sum(lengths)
    if total == 0:
        return torch.zeros(num_rows, vocab_size, dtype=torch.float32, device=device)
    # Lengths and ids share one tensor: one host-to-device copy.
    packed = _to_device(list(chain(lengths, *token_ids)), torch.int64, device)
    rows = torch.repeat_interleave(
        torch.arange(num_rows, device=device), packed[:num_rows], output_size=total
    )
    ids = packed[num_rows:]
    # Ids past the logits' width (a tokenizer larger than the model's vocab) cannot be
    # penalised; they go to a spill column that is dropped.
    ids = torch.where(ids < vocab_size, ids, vocab_size)
    spill = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=device)
    spill.view(-1).scatter_add_(0, rows * (vocab_size + 1) + ids, torch.ones(total, device=device))
    return spill[:, :vocab_size]
