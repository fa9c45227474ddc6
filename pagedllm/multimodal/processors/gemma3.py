"""Gemma 3 processing: the model's own image processor (the PIL one), with pan-and-scan
crops when `do_pan_and_scan` is set (mm_processor_kwargs, engine-wide or per request).

A prompt marks an image with `<start_of_image>`; it becomes "\\n\\n<start_of_image>" +
mm_tokens_per_image x `<image_soft_token>` + "<end_of_image>\\n\\n", and with crops transformers'
"Here is the original image ... and here are some crops to help you see better ..." text
with one such block per crop. Only the soft tokens take encoder rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pagedllm.multimodal.processing import MultiModalProcessorAdapter, ProcessedItem

_PAN_AND_SCAN_DEFAULTS = {
    "pan_and_scan_min_crop_size": 256,
    "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}
_IMAGE_KWARGS = ("do_pan_and_scan", *_PAN_AND_SCAN_DEFAULTS, "size", "image_mean", "image_std",
                 "do_resize", "do_rescale", "do_normalize", "resample", "do_convert_rgb")


class Gemma3ProcessorAdapter(MultiModalProcessorAdapter):
    modalities = ("image",)
    requires_unchunked_items = True
    """An image's tokens attend to each other both ways, so a prefill chunk must hold all of
    an image's placeholder tokens (vLLM's disable_chunked_mm_input): a chunk that ended
    inside one would compute its first tokens without seeing the rest."""

    def __init__(self, model_config: Any, tokenizer: Any) -> None:
        super().__init__(model_config, tokenizer)
        config = self.hf_config
        self.boi_token_id = int(config.boi_token_id)
        self.eoi_token_id = int(config.eoi_token_id)
        self.image_token_id = int(config.image_token_id)
        self.mm_tokens_per_image = int(config.mm_tokens_per_image)
        self._image_processors: dict[tuple, Any] = {}

    def placeholder_text(self, modality: str) -> str:
        return "<start_of_image>"

    def placeholder_token_id(self, modality: str) -> int:
        return self.boi_token_id

    def _options(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(kwargs) - set(_IMAGE_KWARGS))
        if unknown:
            raise ValueError(
                f"mm_processor_kwargs has {unknown}, which the Gemma 3 processor does not take; "
                f"use {', '.join(_IMAGE_KWARGS)}."
            )
        options = dict(kwargs)
        if options.get("do_pan_and_scan"):
            # The image processor has no defaults of its own for these (the full processor does).
            for key, value in _PAN_AND_SCAN_DEFAULTS.items():
                options.setdefault(key, value)
        return options

    def image_processor(self, options: Mapping[str, Any]) -> Any:
        import transformers

        # The PIL processor (named ...Pil from transformers 5.2x; before, the plain name is it):
        # the fast one needs torchvision. It reads the checkpoint's preprocessor_config.json.
        processor_class = getattr(transformers, "Gemma3ImageProcessorPil", None) or transformers.Gemma3ImageProcessor
        constructor = {k: v for k, v in options.items() if k not in ("do_pan_and_scan", *_PAN_AND_SCAN_DEFAULTS)}
        key = tuple(sorted((k, repr(v)) for k, v in constructor.items()))
        if key not in self._image_processors:
            self._image_processors[key] = processor_class.from_pretrained(self.model_config.model_path, **constructor)
        return self._image_processors[key]

    def process(self, modality: str, item: Any, kwargs: Mapping[str, Any]) -> ProcessedItem:
        options = self._options(kwargs)
        call = {k: v for k, v in options.items() if k in ("do_pan_and_scan", *_PAN_AND_SCAN_DEFAULTS)}
        out = self.image_processor(options)(images=[item], return_tensors="pt", **call)
        num_crops = int(out["num_crops"][0])
        return ProcessedItem(
            data={"pixel_values": out["pixel_values"]},
            num_embeds=(1 + num_crops) * self.mm_tokens_per_image,
            extra={"num_crops": num_crops},
        )

    def _text(self, text: str) -> list[int]:
        # Without a tokenizer (skip_tokenizer_init) only the image tokens themselves are placed.
        return self.tokenizer.encode(text, add_special_tokens=False) if self.tokenizer is not None else []

    def _image_block(self) -> list[int]:
        newlines = self._text("\n\n")
        soft_tokens = [self.image_token_id] * self.mm_tokens_per_image
        return newlines + [self.boi_token_id, *soft_tokens, self.eoi_token_id] + newlines

    def replacement(self, modality: str, item: ProcessedItem) -> tuple[list[int], tuple[bool, ...] | None]:
        num_crops = item.extra["num_crops"]
        block = self._image_block()
        if num_crops == 0:
            tokens = block
        else:
            tokens = self._text("Here is the original image ") + block
            tokens += self._text(" and here are some crops to help you see better ")
            for index in range(num_crops):
                tokens += (self._text(" ") if index else []) + block
        return tokens, tuple(token == self.image_token_id for token in tokens)

    def dummy_item(self, modality: str, kwargs: Mapping[str, Any]) -> Any:
        """The image giving the most crops: a strip of pan_and_scan_max_num_crops squares of
        the minimum crop size (one image, no crops, without pan-and-scan)."""
        from PIL import Image

        options = self._options(kwargs)
        if not options.get("do_pan_and_scan"):
            return Image.new("RGB", (64, 64), color=(127, 127, 127))
        side = int(options["pan_and_scan_min_crop_size"])
        return Image.new("RGB", (side * int(options["pan_and_scan_max_num_crops"]), side), color=(127, 127, 127))
