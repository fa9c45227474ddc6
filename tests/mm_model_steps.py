"""Driving a multi-modal model by hand, as the model runner does: one flat prefill step over
several requests (each with its own inputs_embeds), then batched greedy decode steps over a
paged KV cache. Used to compare our vision-language models with transformers' generate()
before (and independently of) the engine's multi-modal wiring."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pagedllm.forward_context import set_forward_context
from pagedllm.layers.attention.layer import Attention

BLOCK_SIZE = 4


def bind_kv_caches(model: torch.nn.Module, num_blocks: int, device: str = "cpu") -> None:
    """NaN-filled caches: reading a slot nobody wrote poisons the result."""
    for module in model.modules():
        if isinstance(module, Attention):
            spec = module.kv_cache_spec()
            module.kv_cache = torch.full(
                (2, num_blocks, BLOCK_SIZE, spec.num_kv_heads, spec.head_size), float("nan"), device=device
            )


def paged_greedy(
    model: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    prompt_embeds: Sequence[torch.Tensor],
    max_new_tokens: int,
    make_attn_metadata: Callable,
    device: str = "cpu",
) -> tuple[list[list[int]], torch.Tensor]:
    """(greedy tokens per request, prefill logits of every prompt token concatenated); the
    model, prompts and embeddings live on `device`."""
    max_len = max(len(p) for p in prompts) + max_new_tokens
    blocks_per_request = -(-max_len // BLOCK_SIZE)
    bind_kv_caches(model, blocks_per_request * len(prompts), device)
    tables = [list(range(i * blocks_per_request, (i + 1) * blocks_per_request)) for i in range(len(prompts))]
    lens = [len(p) for p in prompts]
    with torch.no_grad():
        metadata = make_attn_metadata(lens, lens, tables, BLOCK_SIZE, device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(device)
        with set_forward_context(metadata):
            hidden = model(torch.cat(list(prompts)), positions, torch.cat(list(prompt_embeds)))
        prefill_logits = model.compute_logits(hidden)
        last_rows = torch.tensor(metadata.query_start_loc_cpu[1:], device=device) - 1
        next_tokens = prefill_logits[last_rows].argmax(-1)
        outputs = [[t] for t in next_tokens.tolist()]
        seq_lens = list(lens)
        for _ in range(max_new_tokens - 1):
            positions = torch.tensor(seq_lens, device=device)
            seq_lens = [n + 1 for n in seq_lens]
            metadata = make_attn_metadata([1] * len(prompts), seq_lens, tables, BLOCK_SIZE, device)
            with set_forward_context(metadata):
                hidden = model(next_tokens, positions, model.get_input_embeddings(next_tokens))
            next_tokens = model.compute_logits(hidden).argmax(-1)
            for out, token in zip(outputs, next_tokens.tolist()):
                out.append(token)
    return outputs, prefill_logits


def merged_embeddings(
    model: torch.nn.Module, input_ids: torch.Tensor, image_token_id: int, image_rows: list[torch.Tensor]
) -> torch.Tensor:
    """What the runner feeds a prefill: text embeddings with each image's encoder rows written
    over its placeholder tokens, in order."""
    embeds = model.get_input_embeddings(input_ids)
    if image_rows:
        embeds[input_ids == image_token_id] = torch.cat(image_rows)
    return embeds

