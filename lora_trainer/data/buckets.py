"""Aspect-ratio buckets, as in kohya sd-scripts: images train near their own shape, not cropped square."""

from __future__ import annotations

import math

from lora_trainer.errors import UserError


def make_buckets(
    resolution: int, step: int = 64, min_side: int | None = None, max_side: int | None = None
) -> list[tuple[int, int]]:
    """Sorted, unique (width, height) buckets: sides are multiples of `step`, area is <= resolution**2.

    Sides range over `min_side`..`max_side` (defaults: half and twice `resolution`); the square
    (resolution, resolution) bucket is always included.
    """
    if step <= 0:
        raise UserError(f"The bucket step must be a positive number of pixels, got {step}.")
    if resolution <= 0 or resolution % step:
        raise UserError(f"The resolution must be a positive multiple of {step}, got {resolution}.")
    if min_side is None:
        min_side = max(step, resolution // 2 // step * step)
    if max_side is None:
        max_side = resolution * 2
    for name, side in (("min_side", min_side), ("max_side", max_side)):
        if side <= 0 or side % step:
            raise UserError(f"The bucket {name} must be a positive multiple of {step}, got {side}.")
    if min_side > max_side:
        raise UserError(f"The bucket min_side ({min_side}) must not be larger than max_side ({max_side}).")

    max_area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, max_area // width // step * step)
        if height >= min_side:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width:height (in log ratio); ties go to the larger area."""

    def aspect_distance_then_larger_area(bucket: tuple[int, int]) -> tuple[float, int]:
        bucket_width, bucket_height = bucket
        ratio_of_ratios = (width * bucket_height) / (height * bucket_width)
        return abs(math.log(ratio_of_ratios)), -bucket_width * bucket_height

    return min(buckets, key=aspect_distance_then_larger_area)


def square_bucket(resolution: int) -> tuple[int, int]:
    """The single (resolution, resolution) bucket used when bucketing is off."""
    return (resolution, resolution)
