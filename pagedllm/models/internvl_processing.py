"""InternVL image preprocessing, our own code after InternVL's public description: an image
is cut into a grid of 448 px tiles whose aspect ratio is closest to the image's (between
min_dynamic_patch and max_dynamic_patch tiles; on ties the larger grid while the image covers
more than half of it), plus a 448 px thumbnail of the whole image when there is more than one
tile; each tile is resized bicubically, scaled to [0, 1] and normalised with ImageNet's
mean/std. Each tile becomes num_image_token (256) `<IMG_CONTEXT>` tokens between `<img>` and
`</img>`.

This serves InternVL2's remote-code `InternVLChatModel` checkpoints (whose processor is remote
code) and gives the same tiles as transformers' GotOcr2 `crop_to_patches` used by
`InternVLForConditionalGeneration`. Processor kwargs (`mm_processor_kwargs`):
`max_dynamic_patch`, `min_dynamic_patch`, `use_thumbnail`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TilingOptions:
    image_size: int = 448
    """Side of one tile in pixels (the vision tower's input)."""
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise ValueError(
                f"mm_processor_kwargs min_dynamic_patch={self.min_dynamic_patch}, max_dynamic_patch="
                f"{self.max_dynamic_patch}: need 1 <= min_dynamic_patch <= max_dynamic_patch (e.g. 1 and 12)."
            )


_OPTION_NAMES = ("min_dynamic_patch", "max_dynamic_patch", "use_thumbnail")


def tiling_options(hf_config: Any, mm_processor_kwargs: dict[str, Any] | None = None) -> TilingOptions:
    """Defaults from the checkpoint's config, overridden by mm_processor_kwargs (engine-wide,
    then per request); unknown kwargs are a TypeError naming the ones that apply."""
    kwargs = dict(mm_processor_kwargs or {})
    unknown = sorted(set(kwargs) - set(_OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"mm_processor_kwargs {unknown} do not apply to InternVL; use {', '.join(_OPTION_NAMES)}."
        )
    defaults = {
        "min_dynamic_patch": int(getattr(hf_config, "min_dynamic_patch", 1)),
        "max_dynamic_patch": int(getattr(hf_config, "max_dynamic_patch", 12)),
        "use_thumbnail": bool(getattr(hf_config, "use_thumbnail", True)),
    }
    side = hf_config.vision_config.image_size
    image_size = int(side[0] if isinstance(side, (list, tuple)) else side)
    return TilingOptions(image_size=image_size, **{**defaults, **kwargs})


def num_image_token(hf_config: Any) -> int:
    """Tokens per tile: (image_size / patch_size)^2 * downsample_ratio^2 (256 for 448 px tiles)."""
    vision = hf_config.vision_config
    side = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    return int((side // patch) ** 2 * hf_config.downsample_ratio**2)


def tile_grid(width: int, height: int, options: TilingOptions) -> tuple[int, int]:
    """(columns, rows) of the tile grid for an image of width x height pixels."""
    low, high = options.min_dynamic_patch, options.max_dynamic_patch
    grids = sorted(
        {(cols, rows) for n in range(low, high + 1) for cols in range(1, n + 1) for rows in range(1, n + 1)
         if low <= cols * rows <= high},
        key=lambda grid: grid[0] * grid[1],
    )
    aspect_ratio = width / height
    area = width * height
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in grids:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * options.image_size**2 * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, options: TilingOptions) -> int:
    cols, rows = tile_grid(width, height, options)
    tiles = cols * rows
    return tiles + 1 if options.use_thumbnail and tiles > 1 else tiles


def make_tiles(image: Image.Image, options: TilingOptions) -> list[Image.Image]:
    size = options.image_size
    image = image.convert("RGB")
    cols, rows = tile_grid(image.width, image.height, options)
    resized = image.resize((size * cols, size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)
    ]
    if options.use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((size, size), Image.Resampling.BICUBIC))
    return tiles


def preprocess_image(image: Image.Image, options: TilingOptions) -> torch.Tensor:
    """→ pixel_values [num_tiles, 3, image_size, image_size], float32."""
    arrays = np.stack([np.asarray(tile, dtype=np.float32) / 255.0 for tile in make_tiles(image, options)])
    pixels = (arrays - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

