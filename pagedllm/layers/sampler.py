"""Turns a step's logits into sampled token ids (and their logprobs), vLLM's way.

The model runner builds one `SamplingMetadata` per step for the rows that sample; `Sampler`
then does, in float32: raw logprobs (if asked), min_tokens bans, penalties, greedy argmax for
greedy rows, and for the others temperature, top-k, top-p, min-p and an exponential race
(argmax of probs / Exp(1) noise). Rows with their own generator draw their noise from it
alone, so a seeded request samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pagedllm.engine.scheduler_output import TokenLogprobs
from pagedllm.layers.ops import triton_ops_available
from pagedllm.layers.sampling_metadata import SamplingMetadata
from pagedllm.layers.token_controls import apply_grammar_bitmask, apply_token_controls

if TYPE_CHECKING:
    from pagedllm.layers.ops.argmax import GreedyArgmax

_TRITON_ARGMAX_MAX_ROWS = 8
# Rows of prompt logprobs handled at once, so a long prompt never holds a second
# [num_tokens, vocab] float32 tensor (8k tokens x 150k vocab would be 4.9 GB).
_PROMPT_LOGPROBS_CHUNK_ROWS = 512


@dataclass(slots=True)
class LogprobsTensors:
    """Per row: the chosen token first, then the top-k tokens (columns), and the chosen
    token's rank (1 = most likely)."""

    token_ids: torch.Tensor
    """int64 [rows, 1 + k]"""
    logprobs: torch.Tensor
    """float32 [rows, 1 + k]"""
    ranks: torch.Tensor
    """int64 [rows]"""


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor
    """int64 [rows]"""
    logprobs: LogprobsTensors | None
    """Raw logprobs (of the model's logits, before penalties and temperature), with
    max_num_logprobs top tokens per row; None when no row asked for them."""


class Sampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._greedy_argmax: GreedyArgmax | None = None

    def forward(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """logits: [rows, vocab] in the model's dtype (cast to float32 here when anything
        edits them)."""
        if (
            metadata.all_greedy and metadata.max_num_logprobs is None and metadata.grammar_bitmask is None
            and metadata.token_controls is None and metadata.banned_token_index is None and metadata.no_penalties
        ):
            # Nothing edits the logits, and the argmax of a float32 cast is the argmax.
            return SamplerOutput(sampled_token_ids=self._argmax(logits), logprobs=None)
        logits = logits.to(torch.float32)
        # The grammar mask comes first, as in vLLM (its runner applies it before the sampler).
        logits = apply_grammar_bitmask(logits, metadata.grammar_bitmask)
        # vLLM's default "raw_logprobs": the model's distribution, before any processing.
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        logits = apply_token_controls(logits, metadata.token_controls)
        logits = apply_min_tokens(logits, metadata.banned_token_index)
        if not metadata.no_penalties:
            logits = apply_penalties(logits, metadata)

        if metadata.all_greedy:
            sampled = self._argmax(logits)
        else:
            sampled = self._sample_random(logits, metadata)
            if not metadata.all_random:
                assert metadata.is_greedy is not None
                sampled = torch.where(metadata.is_greedy, self._argmax(logits), sampled)

        logprobs = None
        if raw_logprobs is not None and metadata.max_num_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        # torch reduces one row per block: at decode-latency sizes that leaves the GPU idle
        # (27 µs for one 128k row on an H200, 3.7 µs in Triton); with many rows it is busy and
        # measured as fast in the engine (256-request workload), so it keeps them.
        few_rows = logits.dim() == 2 and logits.shape[0] <= _TRITON_ARGMAX_MAX_ROWS
        if few_rows and logits.is_cuda and triton_ops_available("cuda") and logits.stride(-1) == 1:
            if self._greedy_argmax is None:
                from pagedllm.layers.ops.argmax import GreedyArgmax

                self._greedy_argmax = GreedyArgmax()
            return self._greedy_argmax(logits)
        return logits.argmax(dim=-1)

    @staticmethod
    def _sample_random(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        assert metadata.temperature is not None
        logits = logits / metadata.temperature.unsqueeze(1)
        logits = apply_top_k_top_p(
            logits, metadata.top_k, metadata.max_top_k, metadata.top_p, metadata.top_k_on_every_row
        )
        probs = torch.softmax(logits, dim=-1)
        if metadata.min_p is not None:
            probs = apply_min_p(probs, metadata.min_p)
        return exponential_race(probs, metadata.generators, metadata.default_generator)


def apply_min_tokens(logits: torch.Tensor, banned_token_index: torch.Tensor | None) -> torch.Tensor:
    if banned_token_index is None:
        return logits
    rows, tokens = banned_token_index
    # torch.full fills on the device; torch.tensor(-inf, device=...) would be a tiny copy.
    return logits.index_put((rows, tokens), torch.full((), float("-inf"), device=logits.device))


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (divides positive logits, multiplies
    negative ones, as in HF and vLLM), then frequency and presence penalties over output
    tokens: logits -= frequency * count + presence * (count > 0)."""
    counts = metadata.output_token_counts
    assert counts is not None
    assert metadata.repetition_penalties is not None
    assert metadata.frequency_penalties is not None and metadata.presence_penalties is not None
    occurred = counts > 0
    if metadata.prompt_token_mask is not None:
        seen = occurred | metadata.prompt_token_mask
        penalty = torch.where(seen, metadata.repetition_penalties.unsqueeze(1), 1.0)
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = logits - metadata.frequency_penalties.unsqueeze(1) * counts
    return logits - metadata.presence_penalties.unsqueeze(1) * occurred


# Candidate counts tried for top-p before falling back to sorting the whole vocabulary.
_TOP_P_CANDIDATES = (256, 4096)


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    max_top_k: int,
    top_p: torch.Tensor | None,
    top_k_on_every_row: bool = False,
) -> torch.Tensor:
    """Masks (to -inf) the tokens outside each row's top-k and nucleus (top-p over the top-k
    renormalised, as vLLM does). top_k rows with 0 keep everything.

    Top-p needs tokens in order only up to the nucleus: the top 256 candidates (then 4096)
    hold it whenever their probability mass reaches top_p, which a peaked LM distribution
    almost always does, so the whole vocabulary is sorted only when they do not."""
    if top_k is None and top_p is None:
        return logits
    if top_p is None:
        assert top_k is not None
        return _apply_top_k_only(logits, top_k, max_top_k)
    vocab_size = logits.shape[-1]
    full_lse = torch.logsumexp(logits, dim=-1)
    has_top_k = top_k > 0 if top_k is not None else torch.zeros_like(top_p, dtype=torch.bool)
    # Rows with neither a top-k nor a nucleus keep their logits as they are.
    keeps_all = (top_p >= 1.0) & ~has_top_k
    for num_candidates in (*_TOP_P_CANDIDATES, vocab_size):
        num_candidates = min(max(num_candidates, max_top_k), vocab_size)
        values, indices = logits.topk(num_candidates, dim=-1)
        if top_k is not None:
            values = _mask_beyond_k(values, torch.where(has_top_k, top_k, vocab_size))
        if top_k_on_every_row or num_candidates == vocab_size:
            break
        mass = torch.exp(values - full_lse.unsqueeze(1)).sum(dim=-1)
        if bool((has_top_k | keeps_all | (mass >= top_p)).all()):
            break
    # Rows with a top-k renormalise over it; the others over the whole vocabulary.
    lse = torch.where(has_top_k, torch.logsumexp(values, dim=-1), full_lse)
    values = _mask_outside_nucleus(values, top_p, lse)
    masked = torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)
    return torch.where(keeps_all.unsqueeze(1), logits, masked)


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    # The k-th largest value is the threshold; ties with it are kept, as with a sort.
    top_values = logits.topk(max_top_k, dim=-1).values
    kth = top_values.gather(-1, (top_k.clamp(min=1) - 1).unsqueeze(1))
    kth = torch.where(top_k.unsqueeze(1) > 0, kth, float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def _mask_beyond_k(sorted_values: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(sorted_values.shape[-1], device=sorted_values.device)
    return sorted_values.masked_fill(positions.unsqueeze(0) >= top_k.unsqueeze(1), float("-inf"))


def _mask_outside_nucleus(sorted_values: torch.Tensor, top_p: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """sorted_values: descending per row, normalised by the log-sum-exp lse. Keeps the
    smallest prefix whose probability reaches top_p: a token is dropped when the mass before
    it already does. The first token always stays (the mass before it is exactly 0).

    The running mass is summed in float64: in float32 a sum over thousands of tokens moves
    by ~1e-6 with the summation order (which differs between CPUs and kernels), enough to
    move the nucleus edge when a token's running mass lies that close to top_p."""
    probs = torch.exp(sorted_values - lse.unsqueeze(1))
    mass_before = probs.cumsum(dim=-1, dtype=torch.float64) - probs
    # top_p = 1 keeps every token even where rounding makes the running mass reach 1 early.
    outside = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    return sorted_values.masked_fill(outside, float("-inf"))


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zeroes tokens below min_p times the row's top probability. The result is not
    renormalised: the exponential race is invariant to a row's scale."""
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return probs.masked_fill(probs < threshold, 0.0)


def exponential_race(
    probs: torch.Tensor, generators: dict[int, torch.Generator], default_generator: torch.Generator | None
) -> torch.Tensor:
    """argmax(probs / E) with E ~ Exp(1) i.i.d. samples token i with probability
    probs[i] / sum(probs). Each row in `generators` draws its vocab-sized noise from its own
    generator only."""
    noise = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        noise.exponential_(generator=default_generator)
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    # An Exp(1) draw of exactly 0 would make 0 / 0 = NaN on a masked token, and argmax
    # picks NaN; the smallest normal float keeps it a finite, very likely winner instead.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int) -> LogprobsTensors:
    """logprobs: [n, vocab]; token_ids: [n]. The chosen token's logprob and rank (1 + the
    number of tokens strictly more likely), then the num_logprobs most likely tokens."""
    token_ids = token_ids.to(torch.int64).unsqueeze(1)
    chosen = logprobs.gather(-1, token_ids)
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    if num_logprobs <= 0:
        return LogprobsTensors(token_ids=token_ids, logprobs=chosen, ranks=ranks)
    top_values, top_ids = logprobs.topk(min(num_logprobs, logprobs.shape[-1]), dim=-1)
    return LogprobsTensors(
        token_ids=torch.cat([token_ids, top_ids], dim=1),
        logprobs=torch.cat([chosen, top_values], dim=1),
        ranks=ranks,
    )


def compute_prompt_logprobs(logits: torch.Tensor, target_token_ids: torch.Tensor, num_logprobs: int) -> TokenLogprobs:
    """Raw logprobs of each target token (logits row i scores target i): the target first,
    then the top num_logprobs (-1 = the whole vocabulary)."""
    vocab_size = logits.shape[-1]
    k = vocab_size if num_logprobs == -1 else min(num_logprobs, vocab_size)
    parts = []
    for start in range(0, logits.shape[0], _PROMPT_LOGPROBS_CHUNK_ROWS):
        chunk = torch.log_softmax(logits[start : start + _PROMPT_LOGPROBS_CHUNK_ROWS].to(torch.float32), dim=-1)
        parts.append(gather_logprobs(chunk, target_token_ids[start : start + _PROMPT_LOGPROBS_CHUNK_ROWS], k))
    if not parts:
        return TokenLogprobs(token_ids=[], logprobs=[], ranks=[])
    merged = LogprobsTensors(
        token_ids=torch.cat([p.token_ids for p in parts]),
        logprobs=torch.cat([p.logprobs for p in parts]),
        ranks=torch.cat([p.ranks for p in parts]),
    )
    return to_token_logprobs(merged)


def to_token_logprobs(
    tensors: LogprobsTensors, num_logprobs: int | Sequence[int | None] | None = None
) -> TokenLogprobs:
    """The plain-list form for the engine, one .tolist() per tensor. num_logprobs trims the
    top-k columns: None keeps them all, an int applies to every row, a sequence gives each
    row its own (None there keeps only the chosen token)."""
    token_ids = tensors.token_ids.tolist()
    logprobs = tensors.logprobs.tolist()
    ranks = tensors.ranks.tolist()
    if num_logprobs is not None:
        per_row = [num_logprobs] * len(ranks) if isinstance(num_logprobs, int) else list(num_logprobs)
        keeps = [1 + (k or 0) for k in per_row]
        token_ids = [ids[:keep] for ids, keep in zip(token_ids, keeps)]
        logprobs = [lps[:keep] for lps, keep in zip(logprobs, keeps)]
    return TokenLogprobs(token_ids=token_ids, logprobs=logprobs, ranks=ranks)
