"""The model runner's multi-modal part: per-request items, the encoder-output cache, the
merge of vision embeddings into the prompt's embeddings, and M-RoPE positions.

ModelRunner calls it at three points: `add_request` / `remove_request` when its request
states change, and `prepare(inputs)` before the forward, which returns the step's
`inputs_embeds` (None when no scheduled token is a placeholder) and replaces
`inputs.positions` where M-RoPE needs it. An item is encoded once, at the first step that
computes any of its placeholder tokens, and its output is kept until its last placeholder
token is computed, so chunked prefill may split an item anywhere. Decode steps carry no
placeholders: they keep the input_ids path (and CUDA graphs), with 1-D positions p + delta.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pagedllm.engine.scheduler_output import NewRequestData
from pagedllm.multimodal.inputs import MultiModalFeature, PlaceholderRange
from pagedllm.worker.input_batch import StepInputs

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _RequestItems:
    features: list[Any]
    mrope_positions: np.ndarray | None
    mrope_position_delta: int
    encoder_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    """Feature index → its encoder output, while some of its placeholder tokens remain."""


def supports_multimodal(model: nn.Module) -> bool:
    return bool(getattr(model, "supports_multimodal", False))


class MultiModalRunner:
    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.uses_mrope = bool(getattr(model, "uses_mrope", False))
        self.requests: dict[str, _RequestItems] = {}
        self.num_encoder_calls = 0
        """Items encoded since start-up (tests check an item is encoded once)."""

    def add_request(self, new: NewRequestData) -> None:
        if new.mm_features or new.mrope_positions is not None:
            self.requests[new.req_id] = _RequestItems(
                list(new.mm_features), new.mrope_positions, int(new.mrope_position_delta)
            )

    def remove_request(self, req_id: str) -> None:
        self.requests.pop(req_id, None)

    def prepare(self, inputs: StepInputs) -> torch.Tensor | None:
        """The step's inputs_embeds, or None when no placeholder token is scheduled; sets
        inputs.positions to M-RoPE positions when a scheduled request has them."""
        if not self.requests:
            return None
        scheduled = [
            (req_id, start, query_start, query_len)
            for req_id, start, query_start, query_len in zip(
                inputs.req_ids, inputs.start_positions, inputs.query_starts, inputs.query_lens
            )
            if req_id in self.requests
        ]
        if not scheduled:
            return None
        if self.uses_mrope:
            inputs.positions = self._mrope_positions(inputs, scheduled)
        overlaps = []
        to_encode: dict[str, list[tuple[_RequestItems, int]]] = {}
        for req_id, start, query_start, query_len in scheduled:
            state = self.requests[req_id]
            for index, feature in enumerate(state.features):
                offset, length = feature.placeholder.offset, feature.placeholder.length
                first, last = max(start, offset), min(start + query_len, offset + length)
                if first >= last:
                    continue
                overlaps.append((state, index, first, last, query_start - start))
                if index not in state.encoder_outputs:
                    to_encode.setdefault(feature.modality, []).append((state, index))
        if not overlaps:
            return None
        for modality, pending in to_encode.items():
            outputs = self._encode(modality, [state.features[index] for state, index in pending])
            for (state, index), output in zip(pending, outputs):
                state.encoder_outputs[index] = output
        rows, embeds = [], []
        for state, index, first, last, row_shift in overlaps:
            feature = state.features[index]
            offset, length = feature.placeholder.offset, feature.placeholder.length
            local = np.arange(first - offset, last - offset)
            if feature.placeholder.is_embed is not None:
                mask = np.asarray(feature.placeholder.is_embed, dtype=bool)
                local = local[mask[local]]
                output_rows = (np.cumsum(mask) - 1)[local]
            else:
                output_rows = local
            rows.append(offset + row_shift + local)
            embeds.append(state.encoder_outputs[index][torch.from_numpy(output_rows).to(self.device)])
            if last == offset + length:
                del state.encoder_outputs[index]
        inputs_embeds = self.model.get_input_embeddings(inputs.input_ids)
        row_index = torch.from_numpy(np.concatenate(rows)).to(self.device)
        inputs_embeds[row_index] = torch.cat(embeds).to(inputs_embeds.dtype)
        return inputs_embeds

    def _encode(self, modality: str, features: list[Any]) -> list[torch.Tensor]:
        """Encoder outputs of the step's new items of one modality: in one call when the model
        has `embed_multimodal_batch(modality, [data, ...])`, else item by item."""
        datas = [
            {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in f.data.items()}
            for f in features
        ]
        self.num_encoder_calls += len(features)
        batch_fn = getattr(self.model, "embed_multimodal_batch", None)
        if batch_fn is not None and len(datas) > 1:
            return list(batch_fn(modality, datas))
        return [self.model.embed_multimodal(modality, data) for data in datas]

    def _mrope_positions(self, inputs: StepInputs, scheduled: list[tuple[str, int, int, int]]) -> torch.Tensor:
        """[3, T] positions (or [T] when all three rows agree, as in decode steps, which keeps
        CUDA graphs usable): the prompt's precomputed table, and p + delta after the prompt."""
        num_tokens = sum(inputs.query_lens)
        positions = np.empty((3, num_tokens), dtype=np.int64)
        for start, query_start, query_len in zip(inputs.start_positions, inputs.query_starts, inputs.query_lens):
            positions[:, query_start : query_start + query_len] = np.arange(start, start + query_len)
        for req_id, start, query_start, query_len in scheduled:
            state = self.requests[req_id]
            columns = np.arange(start, start + query_len)
            out = positions[:, query_start : query_start + query_len]
            out += state.mrope_position_delta
            table = state.mrope_positions
            if table is not None:
                in_prompt = columns < table.shape[1]
                out[:, in_prompt] = table[:, columns[in_prompt]]
        if (positions[0] == positions[1]).all() and (positions[0] == positions[2]).all():
            return torch.from_numpy(positions[0]).to(self.device)
        return torch.from_numpy(positions).to(self.device)

    @torch.inference_mode()
    def profile_encoder(self, engine_config: Any) -> list[torch.Tensor]:
        """Encodes the largest items the limits allow, for each modality that is on: as many as
        one step's encoder budget (max_num_batched_tokens) holds, at least one, at most the
        per-prompt limit. The budget bounds a step's new encoder tokens over all modalities,
        so the outputs returned (the caller keeps them alive through the text forward, as in
        a real step) are those of the modality that gave the most rows."""
        from pagedllm.multimodal.processing import MultiModalProcessor

        model_config = engine_config.model_config
        mm_config = model_config.multimodal_config
        if mm_config is None or mm_config.is_text_only:
            return []
        processor = MultiModalProcessor(model_config, tokenizer=None)
        budget = max(engine_config.scheduler_config.max_num_batched_tokens, 1)
        kept: list[torch.Tensor] = []
        for modality in mm_config.modalities:
            limit = mm_config.limit_of(modality)
            if limit == 0:
                continue
            item = processor.dummy_features(modality)
            num_items = max(1, min(limit, budget // max(item.num_embeds, 1)))
            # Encoded together, as a step that starts them all would.
            dummy = MultiModalFeature(modality, "profile", item.data, PlaceholderRange(0, item.num_embeds))
            outputs = self._encode(modality, [dummy] * num_items)
            if sum(o.shape[0] for o in outputs) > sum(o.shape[0] for o in kept):
                kept = outputs
            del outputs
            logger.info(
                "Profiling %d %s item(s) of %d tokens each (largest under mm_processor_kwargs %s).",
                num_items, modality, item.num_embeds, mm_config.mm_processor_kwargs,
            )
        return kept
