"""Qwen2-VL / Qwen2.5-VL processing: the model's own image processor (the PIL one: the fast
one needs torchvision), videos as frames through the same resize and normalisation, and the
M-RoPE positions of the expanded prompt."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pagedllm.multimodal.inputs import MultiModalFeature
from pagedllm.multimodal.processing import MultiModalProcessorAdapter, ProcessedItem

# Keys the image processor's constructor takes; others are rejected by name.
_IMAGE_KWARGS = ("min_pixels", "max_pixels", "size", "patch_size", "merge_size", "temporal_patch_size",
                 "image_mean", "image_std", "do_resize", "do_rescale", "do_normalize", "resample")
_VIDEO_KWARGS = ("fps",)


class Qwen2VLProcessorAdapter(MultiModalProcessorAdapter):
    modalities = ("image", "video")
    uses_time_interval = False
    """Qwen2.5-VL spaces video frames' temporal positions by seconds; Qwen2-VL does not."""

    def __init__(self, model_config: Any, tokenizer: Any) -> None:
        super().__init__(model_config, tokenizer)
        config = self.hf_config
        self.image_token_id = int(config.image_token_id)
        self.video_token_id = int(config.video_token_id)
        self.merge_size = int(config.vision_config.spatial_merge_size)
        self.tokens_per_second = float(getattr(config.vision_config, "tokens_per_second", 1) or 1)
        self._image_processors: dict[tuple, Any] = {}

    def placeholder_text(self, modality: str) -> str:
        pad = "<|image_pad|>" if modality == "image" else "<|video_pad|>"
        return f"<|vision_start|>{pad}<|vision_end|>"

    def placeholder_token_id(self, modality: str) -> int:
        return self.image_token_id if modality == "image" else self.video_token_id

    def image_processor(self, kwargs: Mapping[str, Any]) -> Any:
        import transformers

        # The PIL processor (named ...Pil from transformers 5.2x; before, the plain name is it):
        # the fast one needs torchvision. It reads the checkpoint's preprocessor_config.json.
        processor_class = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor

        unknown = sorted(set(kwargs) - set(_IMAGE_KWARGS) - set(_VIDEO_KWARGS))
        if unknown:
            raise ValueError(
                f"mm_processor_kwargs has {unknown}, which the Qwen2-VL processor does not take; "
                f"use {', '.join(_IMAGE_KWARGS + _VIDEO_KWARGS)}."
            )
        image_kwargs = {k: v for k, v in kwargs.items() if k in _IMAGE_KWARGS}
        key = tuple(sorted((k, repr(v)) for k, v in image_kwargs.items()))
        if key not in self._image_processors:
            self._image_processors[key] = processor_class.from_pretrained(self.model_config.model_path, **image_kwargs)
        return self._image_processors[key]

    def process(self, modality: str, item: Any, kwargs: Mapping[str, Any]) -> ProcessedItem:
        processor = self.image_processor(kwargs)
        if modality == "image":
            out = processor(images=[_to_rgb(item)], return_tensors="pt")
            grid = [int(x) for x in out["image_grid_thw"][0]]
            data = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
            extra: dict[str, Any] = {"grid_thw": grid}
        else:
            pixels, grid = self._process_video(processor, item)
            data = {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([grid])}
            fps = float(kwargs.get("fps", 2.0))
            extra = {"grid_thw": grid, "second_per_grid_t": processor.temporal_patch_size / fps}
        num_embeds = grid[0] * grid[1] * grid[2] // self.merge_size**2
        return ProcessedItem(data=data, num_embeds=num_embeds, extra=extra)

    def _process_video(self, processor: Any, frames: Any) -> tuple[torch.Tensor, list[int]]:
        """Each frame through the image processor (same size for all), then consecutive
        frames paired along the temporal patch axis (the last frame repeated to fill it)."""
        frames = [_to_rgb(f) for f in (frames if isinstance(frames, (list, tuple)) else list(frames))]
        temporal = int(processor.temporal_patch_size)
        while len(frames) % temporal:
            frames.append(frames[-1])
        per_frame = []
        for frame in frames:
            out = processor(images=[frame], return_tensors="pt")
            _, grid_h, grid_w = (int(x) for x in out["image_grid_thw"][0])
            patches = out["pixel_values"]  # [h*w, C * temporal * p * p], the frame repeated in time
            per_frame.append(patches.view(patches.shape[0], 3, temporal, -1)[:, :, 0])
        groups = []
        for start in range(0, len(per_frame), temporal):
            stacked = torch.stack(per_frame[start : start + temporal], dim=2)  # [hw, C, temporal, p*p]
            groups.append(stacked.reshape(stacked.shape[0], -1))
        return torch.cat(groups), [len(frames) // temporal, grid_h, grid_w]

    def dummy_item(self, modality: str, kwargs: Mapping[str, Any]) -> Any:
        """A square image at the processor's largest pixel count (max_pixels), but no more tokens
        than max_model_len: a larger image could never be part of an accepted prompt."""
        from PIL import Image

        processor = self.image_processor(kwargs)
        factor = int(processor.patch_size) * int(processor.merge_size)
        max_pixels = int(_size_of(processor, "longest_edge", "max_pixels"))
        max_pixels = min(max_pixels, (self.model_config.max_model_len - 1) * factor * factor)
        side = max(factor, int((max_pixels**0.5) // factor) * factor)
        image = Image.new("RGB", (side, side), color=(127, 127, 127))
        return image if modality == "image" else [image] * int(processor.temporal_patch_size)

    def mrope_positions(self, token_ids: list[int], features: list[MultiModalFeature]) -> tuple[np.ndarray, int]:
        """transformers' get_rope_index for one prompt: text tokens count up in all three rows;
        an item's tokens take (t, h, w) grid coordinates offset by the position before it,
        and the text after it resumes at that position + max(h, w). Decoding continues one
        past the last prompt token, as transformers' generate does (it steps the last column):
        a video whose scaled time positions run past the text after it does not move it."""
        rows: list[np.ndarray] = []
        cursor, position = 0, 0
        for feature in sorted(features, key=lambda f: f.placeholder.offset):
            offset = feature.placeholder.offset
            if offset > cursor:
                rows.append(np.broadcast_to(np.arange(offset - cursor) + position, (3, offset - cursor)))
                position += offset - cursor
            t, h, w = feature.extra["grid_thw"]
            h, w = h // self.merge_size, w // self.merge_size
            interval = 1.0
            if feature.modality == "video" and self.uses_time_interval:
                interval = self.tokens_per_second * feature.extra["second_per_grid_t"]
            t_index = (np.arange(t) * interval).astype(np.int64)
            grid_t, grid_h, grid_w = np.meshgrid(t_index, np.arange(h), np.arange(w), indexing="ij")
            rows.append(np.stack([grid_t.ravel(), grid_h.ravel(), grid_w.ravel()]) + position)
            position += max(h, w)
            cursor = offset + feature.placeholder.length
        if cursor < len(token_ids):
            rows.append(np.broadcast_to(np.arange(len(token_ids) - cursor) + position, (3, len(token_ids) - cursor)))
        positions = np.ascontiguousarray(np.concatenate(rows, axis=1), dtype=np.int64)
        return positions, int(positions[:, -1].max()) + 1 - len(token_ids)


class Qwen2_5_VLProcessorAdapter(Qwen2VLProcessorAdapter):
    uses_time_interval = True


def _to_rgb(image: Any) -> Any:
    return image.convert("RGB") if hasattr(image, "convert") and getattr(image, "mode", "RGB") != "RGB" else image


def _size_of(processor: Any, size_key: str, legacy_attr: str) -> int:
    size = getattr(processor, "size", None)
    value = size.get(size_key) if isinstance(size, dict) else getattr(size, size_key, None)
    return int(value or getattr(processor, legacy_attr))
