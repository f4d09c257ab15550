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
    bucket_width, bucket_height = bucket
    scale = max(bucket_width / image.width, bucket_height / image.height)
    resized_size = (
        max(bucket_width, round(image.width * scale)),
        max(bucket_height, round(image.height * scale)),
    )
    if resized_size != image.size:
        image = image.resize(resized_size, _LANCZOS)
    spare_width, spare_height = image.width - bucket_width, image.height - bucket_height
    if random_crop:
        crop_left, crop_top = rng.randint(0, spare_width), rng.randint(0, spare_height)
    else:
        crop_left, crop_top = spare_width // 2, spare_height // 2
    cropped = image.crop((crop_left, crop_top, crop_left + bucket_width, crop_top + bucket_height))
    return cropped, (crop_top, crop_left)


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
