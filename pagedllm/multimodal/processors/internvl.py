"""InternVL processing: dynamic tiling into 448 px tiles plus a thumbnail. transformers'
`InternVLForConditionalGeneration` checkpoints use their own image processor (GotOcr2's
crop_to_patches, the PIL one); InternVL2's remote-code `InternVLChatModel` checkpoints use our
implementation of InternVL's tiling (models/internvl_processing.py), which gives the same tiles.

A prompt marks an image with `<IMG_CONTEXT>` (InternVL2 chat checkpoints also take vLLM's
text mark `<image>`, see `prompt_text`); it becomes `<img>` + tiles x num_image_token
`<IMG_CONTEXT>` + `</img>`. mm_processor_kwargs: `max_dynamic_patch`, `min_dynamic_patch`,
`use_thumbnail` (both layouts).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pagedllm.models.internvl_config import added_token_id
from pagedllm.models.internvl_processing import (
    IMAGENET_MEAN,
    TilingOptions,
    num_image_token,
    preprocess_image,
    tiling_options,
)
from pagedllm.multimodal.processing import MultiModalProcessorAdapter, ProcessedItem

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


class InternVLProcessorAdapter(MultiModalProcessorAdapter):
    modalities = ("image",)

    def __init__(self, model_config: Any, tokenizer: Any) -> None:
        super().__init__(model_config, tokenizer)
        self.image_token_id = int(self.hf_config.image_token_id)
        self.tokens_per_tile = num_image_token(self.hf_config)
        self.uses_own_tiling = self.model_config.architecture == "InternVLChatModel"
        self._image_processor: Any = None
        # <img> / </img> around each image; from the tokenizer files when it is not loaded
        # (skip_tokenizer_init), and left out if neither has them.
        self.frame_token_ids = [self._token_id(t) for t in (IMG_START, IMG_END)]

    def _token_id(self, token: str) -> int | None:
        if self.tokenizer is not None:
            return int(self.tokenizer.convert_tokens_to_ids(token))
        return added_token_id(self.model_config.model_path, token)

    def placeholder_text(self, modality: str) -> str:
        return IMG_CONTEXT

    def prompt_text(self, text: str) -> str:
        """InternVL2's own prompts (and vLLM's) mark an image with the text "<image>", which
        its tokenizer splits into several tokens: for those checkpoints it becomes the one-token
        mark before the engine tokenizes the prompt."""
        return text.replace("<image>", IMG_CONTEXT) if self.uses_own_tiling else text

    def placeholder_token_id(self, modality: str) -> int:
        return self.image_token_id

    def _tiling(self, kwargs: Mapping[str, Any]) -> TilingOptions:
        if self.uses_own_tiling:
            return tiling_options(self.hf_config, kwargs)
        # transformers' layout: defaults from the checkpoint's image processor.
        processor = self._hf_image_processor()
        defaults = {
            "min_dynamic_patch": int(processor.min_patches), "max_dynamic_patch": int(processor.max_patches),
        }
        return tiling_options(self.hf_config, {**defaults, **kwargs})

    def _hf_image_processor(self) -> Any:
        if self._image_processor is None:
            import transformers

            # The PIL processor (GotOcr2ImageProcessorPil from transformers 5.2x, the plain name
            # before): the fast one needs torchvision.
            processor_class = (
                getattr(transformers, "GotOcr2ImageProcessorPil", None) or transformers.GotOcr2ImageProcessor
            )
            self._image_processor = processor_class.from_pretrained(self.model_config.model_path)
        return self._image_processor

    def process(self, modality: str, item: Any, kwargs: Mapping[str, Any]) -> ProcessedItem:
        options = self._tiling(kwargs)
        if self.uses_own_tiling:
            pixel_values = preprocess_image(item, options)
        else:
            out = self._hf_image_processor()(
                images=[item.convert("RGB")], crop_to_patches=True, min_patches=options.min_dynamic_patch,
                max_patches=options.max_dynamic_patch, return_tensors="pt",
            )
            pixel_values = out["pixel_values"]
            if not options.use_thumbnail and pixel_values.shape[0] > 1:
                pixel_values = pixel_values[:-1]  # GotOcr2 always appends the thumbnail
        num_tiles = int(pixel_values.shape[0])
        return ProcessedItem(
            data={"pixel_values": pixel_values}, num_embeds=num_tiles * self.tokens_per_tile,
            extra={"num_tiles": num_tiles},
        )

    def replacement(self, modality: str, item: ProcessedItem) -> tuple[list[int], tuple[bool, ...] | None]:
        start, end = ([] if t is None else [t] for t in self.frame_token_ids)
        tokens = start + [self.image_token_id] * item.num_embeds + end
        return tokens, tuple(token == self.image_token_id for token in tokens)

    def dummy_item(self, modality: str, kwargs: Mapping[str, Any]) -> Any:
        """The image giving the most tiles: max_dynamic_patch side by side (plus the thumbnail)."""
        from PIL import Image

        options = self._tiling(kwargs)
        side = options.image_size
        color = tuple(int(255 * m) for m in IMAGENET_MEAN)
        return Image.new("RGB", (side * options.max_dynamic_patch, side), color=color)
