"""Our InternVL dynamic tiling (for InternVL2's remote-code checkpoints) against transformers'
GotOcr2 crop_to_patches, which implements the same published algorithm: same tile count and
bit-identical pixel values (both resize with PIL bicubic), for square, wide, tall and extreme
images and several max_dynamic_patch values; and its option checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from tiny_vlm_checkpoints import IMAGENET_MEAN, IMAGENET_STD, random_image

from pagedllm.models.internvl_processing import (
    TilingOptions,
    num_image_token,
    num_tiles,
    preprocess_image,
    tiling_options,
)

TILE = 28


@pytest.mark.parametrize("max_patches", [1, 4, 6])
@pytest.mark.parametrize("size", [(28, 28), (90, 30), (30, 90), (100, 70), (10, 120), (84, 28), (50, 50)])
def test_tiles_equal_transformers_crop_to_patches(size: tuple[int, int], max_patches: int) -> None:
    image = random_image(*size, seed=sum(size))
    options = TilingOptions(image_size=TILE, max_dynamic_patch=max_patches)
    ours = preprocess_image(image, options)
    processor = transformers.GotOcr2ImageProcessorPil(
        crop_to_patches=True, min_patches=1, max_patches=max_patches, size={"height": TILE, "width": TILE},
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    )
    expected = processor(image, return_tensors="pt")["pixel_values"]
    assert ours.shape == expected.shape == (num_tiles(*size, options), 3, TILE, TILE)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_wider_images_get_more_tiles_up_to_max_dynamic_patch() -> None:
    options = TilingOptions(image_size=448, max_dynamic_patch=12)
    assert num_tiles(448, 448, options) == 1
    assert num_tiles(896, 448, options) == 3  # 2 tiles + thumbnail
    assert num_tiles(448 * 20, 448, options) == 13  # 12 x 1 + thumbnail
    assert num_tiles(448 * 20, 448, TilingOptions(image_size=448, max_dynamic_patch=6)) == 7
    assert num_tiles(896, 448, TilingOptions(image_size=448, use_thumbnail=False)) == 2


def test_processor_kwargs_override_the_checkpoint_defaults_and_are_checked() -> None:
    config = SimpleNamespace(
        vision_config=SimpleNamespace(image_size=448, patch_size=14), downsample_ratio=0.5,
        min_dynamic_patch=1, max_dynamic_patch=12, use_thumbnail=True,
    )
    assert num_image_token(config) == 256
    assert tiling_options(config).max_dynamic_patch == 12
    assert tiling_options(config, {"max_dynamic_patch": 2}).max_dynamic_patch == 2
    with pytest.raises(TypeError, match="max_pixels.*max_dynamic_patch"):
        tiling_options(config, {"max_pixels": 100})
    with pytest.raises(ValueError, match="max_dynamic_patch=0"):
        tiling_options(config, {"max_dynamic_patch": 0})
