"""Per-sample transforms: fit an image to its bucket, turn it into a tensor, and vary its caption."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

# Pillow 9.1 moved the filters into Image.Resampling; older releases only have the module constants.
_LANCZOS = getattr(Image, "Resampling", Image).LANCZOS


def crop_to_bucket(
    image: Image.Image, bucket: tuple[int, int], random_crop: bool, rng: random.Random
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize `image` to cover `bucket` (keeping its aspect ratio), then crop it to exactly the bucket size.

    The crop is centred, or placed at random when `random_crop`. Returns the crop and its
    (crop_top, crop_left) in the resized image's pixels, as SDXL's crop conditioning expects.
    """
    crop = crop_position(image.size, bucket, random_crop, rng)
    return crop_like(image, bucket, crop, _LANCZOS), crop


def crop_position(size: tuple[int, int], bucket: tuple[int, int], random_crop: bool, rng: random.Random
                  ) -> tuple[int, int]:
    """(crop_top, crop_left) of `crop_to_bucket` for an image of `size` (width, height), known without
    decoding it."""
    resized_size = _covering_size(size, bucket)
    spare_width, spare_height = resized_size[0] - bucket[0], resized_size[1] - bucket[1]
    if random_crop:
        crop_left, crop_top = rng.randint(0, spare_width), rng.randint(0, spare_height)
    else:
        crop_left, crop_top = spare_width // 2, spare_height // 2
    return crop_top, crop_left


def crop_like(image: Image.Image, bucket: tuple[int, int], crop: tuple[int, int], resample: int = _LANCZOS
              ) -> Image.Image:
    """Resize and crop `image` as `crop_to_bucket` did to an image of the same size (its mask, say), given the
    (crop_top, crop_left) it returned."""
    resized_size = _covering_size(image.size, bucket)
    if resized_size != image.size:
        image = image.resize(resized_size, resample)
    crop_top, crop_left = crop
    return image.crop((crop_left, crop_top, crop_left + bucket[0], crop_top + bucket[1]))


def _covering_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The size of `size` scaled (aspect kept) to cover `bucket`."""
    bucket_width, bucket_height = bucket
    scale = max(bucket_width / size[0], bucket_height / size[1])
    return max(bucket_width, round(size[0] * scale)), max(bucket_height, round(size[1] * scale))


def to_tensor(image: Image.Image, flip: bool) -> torch.Tensor:
    """The image as a float32 (3, height, width) tensor in [-1, 1], mirrored left-right when `flip`."""
    pixels = np.array(image.convert("RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0
    return tensor.flip(-1) if flip else tensor


def process_caption(
    caption: str, shuffle: bool, keep_tokens: int, dropout_rate: float, rng: random.Random
) -> str:
    """kohya caption handling: with probability `dropout_rate` the caption becomes "".

    Otherwise, when `shuffle`, the comma-separated tokens after the first `keep_tokens` are shuffled
    and all are joined with ", "; without `shuffle` the caption is returned unchanged.
    """
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tokens = [token.strip() for token in caption.split(",") if token.strip()]
    kept_tokens, shuffled_tokens = tokens[:keep_tokens], tokens[keep_tokens:]
    rng.shuffle(shuffled_tokens)
    return ", ".join(kept_tokens + shuffled_tokens)
