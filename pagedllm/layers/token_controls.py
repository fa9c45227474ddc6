"""Per-request edits of the logits row before sampling: the structured-output token bitmask,
user logits processors, allowed_token_ids, bad_words and logit_bias (vLLM's order: the
grammar mask first, then the whitelist, the bad words and the bias; penalties come after).

Built once per step from the rows' SamplingParams; rows without controls cost nothing, and a
step without any builds nothing (`build_token_controls` returns None)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pagedllm.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class TokenControls:
    allowed_mask: torch.Tensor | None = None
    """bool [rows, vocab]: True where a token may be sampled (rows without a list: all)."""
    bias_index: tuple[torch.Tensor, torch.Tensor] | None = None
    bias_values: torch.Tensor | None = None
    """float32 [n]: added at (row, token) pairs of bias_index."""
    banned_index: tuple[torch.Tensor, torch.Tensor] | None = None
    """(row, token) pairs that bad_words forbids this step."""
    processors: list[tuple[int, Any, Sequence[int], Sequence[int]]] = field(default_factory=list)
    """(row, callable, prompt ids, output ids) for per-request logits processors."""


def _banned_by_bad_words(bad_words: list[list[int]], output_ids: Sequence[int]) -> list[int]:
    """The last token of each bad word whose preceding tokens end the output so far."""
    banned = []
    for word in bad_words:
        prefix = word[:-1]
        if len(output_ids) < len(prefix):
            continue
        if not prefix or list(output_ids[len(output_ids) - len(prefix) :]) == prefix:
            banned.append(word[-1])
    return banned


def build_token_controls(
    params: Sequence[SamplingParams],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    vocab_size: int,
    device: torch.device,
) -> TokenControls | None:
    if not any(p.has_token_controls for p in params):
        return None
    controls = TokenControls()
    allowed_rows = [(row, p.allowed_token_ids) for row, p in enumerate(params) if p.allowed_token_ids]
    if allowed_rows:
        mask = np.ones((len(params), vocab_size), dtype=np.bool_)
        for row, ids in allowed_rows:
            mask[row] = False
            mask[row, [t for t in ids if t < vocab_size]] = True
        controls.allowed_mask = torch.from_numpy(mask).to(device)
    bias_rows, bias_tokens, bias_values = [], [], []
    ban_rows, ban_tokens = [], []
    for row, (p, prompt, output) in enumerate(zip(params, prompt_token_ids, output_token_ids)):
        for token_id, bias in (p.logit_bias or {}).items():
            if token_id < vocab_size:
                bias_rows.append(row)
                bias_tokens.append(token_id)
                bias_values.append(bias)
        if p.bad_words_token_ids:
            banned = _banned_by_bad_words(p.bad_words_token_ids, output)
            ban_rows.extend([row] * len(banned))
            ban_tokens.extend(banned)
        for processor in p.logits_processors or ():
            controls.processors.append((row, processor, prompt, output))
    if bias_rows:
        index = torch.tensor([bias_rows, bias_tokens], dtype=torch.int64).to(device)
        controls.bias_index = (index[0], index[1])
        controls.bias_values = torch.tensor(bias_values, dtype=torch.float32).to(device)
    if ban_rows:
        index = torch.tensor([ban_rows, ban_tokens], dtype=torch.int64).to(device)
        controls.banned_index = (index[0], index[1])
    return controls


def _takes_prompt_ids(processor: Any) -> bool:
    try:
        return len(inspect.signature(processor).parameters) == 3
    except (TypeError, ValueError):
        return False


def apply_token_controls(logits: torch.Tensor, controls: TokenControls | None) -> torch.Tensor:
    """logits: float32 [rows, vocab]; returns the edited logits (may be the same tensor)."""
    if controls is None:
        return logits
    for row, processor, prompt_ids, output_ids in controls.processors:
        row_logits = logits[row]
        if _takes_prompt_ids(processor):
            result = processor(list(prompt_ids), list(output_ids), row_logits)
        else:
            result = processor(list(output_ids), row_logits)
        logits[row] = result
    if controls.allowed_mask is not None:
        logits = logits.masked_fill(~controls.allowed_mask, float("-inf"))
    if controls.banned_index is not None:
        logits = logits.index_put(controls.banned_index, torch.full((), float("-inf"), device=logits.device))
    if controls.bias_index is not None:
        assert controls.bias_values is not None
        logits = logits.index_put(controls.bias_index, controls.bias_values, accumulate=True)
    return logits


def apply_grammar_bitmask(logits: torch.Tensor, bitmask: torch.Tensor | None) -> torch.Tensor:
    """bitmask: int32 [rows, ceil(vocab / 32)], bit j of word i allows token 32 i + j (xgrammar's
    layout); -1 words allow everything. Tokens past the bitmask (ids the tokenizer lacks but the
    logits have) are disallowed; bits past the logits are ignored."""
    if bitmask is None:
        return logits
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(bitmask.shape[0], -1)
    vocab_size = logits.shape[-1]
    if allowed.shape[1] >= vocab_size:
        allowed = allowed[:, :vocab_size]
    else:
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]), value=False)
    return logits.masked_fill(~allowed, float("-inf"))
