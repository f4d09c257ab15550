"""Aspect-ratio buckets: kohya-compatible shapes, and each image goes to the bucket nearest its shape."""

from __future__ import annotations

import pytest

from lora_trainer.data.buckets import make_buckets, nearest_bucket, square_bucket
from lora_trainer.errors import UserError


def test_buckets_for_512_match_kohya():
    assert make_buckets(512) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    ]  # fmt: skip


@pytest.mark.parametrize("resolution", [512, 768, 1024])
def test_every_side_is_a_multiple_of_the_step(resolution):
    assert all(width % 64 == 0 and height % 64 == 0 for width, height in make_buckets(resolution))


@pytest.mark.parametrize("resolution", [512, 768, 1024])
def test_no_bucket_has_more_pixels_than_the_square(resolution):
    assert all(width * height <= resolution**2 for width, height in make_buckets(resolution))


@pytest.mark.parametrize("resolution", [64, 512, 1024])
def test_the_square_bucket_is_always_included(resolution):
    assert (resolution, resolution) in make_buckets(resolution)


def test_buckets_are_sorted_and_unique():
    buckets = make_buckets(1024)

    assert buckets == sorted(set(buckets))


def test_default_sides_range_from_half_to_twice_the_resolution():
    buckets = make_buckets(1024)

    assert min(min(bucket) for bucket in buckets) == 512
    assert max(max(bucket) for bucket in buckets) == 2048


def test_buckets_cover_wide_and_tall_shapes_symmetrically():
    buckets = make_buckets(768)

    assert {(height, width) for width, height in buckets} == set(buckets)


def test_custom_side_limits_bound_every_bucket():
    buckets = make_buckets(512, min_side=384, max_side=640)

    assert all(384 <= side <= 640 for bucket in buckets for side in bucket)
    assert (384, 640) in buckets


def test_smaller_step_gives_finer_buckets():
    assert len(make_buckets(512, step=32)) > len(make_buckets(512, step=64))


def test_resolution_not_a_multiple_of_the_step_is_refused():
    with pytest.raises(UserError, match="multiple of 64"):
        make_buckets(500)


@pytest.mark.parametrize("step", [0, -64])
def test_step_that_is_not_positive_is_refused(step):
    with pytest.raises(UserError, match="step"):
        make_buckets(512, step=step)


def test_side_limit_not_a_multiple_of_the_step_is_refused():
    with pytest.raises(UserError, match="min_side"):
        make_buckets(512, min_side=300)


def test_min_side_above_max_side_is_refused():
    with pytest.raises(UserError, match="must not be larger"):
        make_buckets(512, min_side=768, max_side=384)


def test_square_image_goes_to_the_square_bucket():
    assert nearest_bucket(3000, 3000, make_buckets(512)) == (512, 512)


def test_wide_image_goes_to_the_bucket_with_the_closest_aspect_ratio():
    # 2:1 lies between 704x320 (2.2:1) and 640x384 (1.67:1); 2.2 is closer in log ratio.
    assert nearest_bucket(2000, 1000, make_buckets(512)) == (704, 320)


def test_tall_image_goes_to_a_tall_bucket():
    assert nearest_bucket(1000, 2000, make_buckets(512)) == (320, 704)


def test_bucket_choice_depends_on_shape_not_size():
    buckets = make_buckets(512)

    assert nearest_bucket(30, 20, buckets) == nearest_bucket(3000, 2000, buckets)


def test_equal_aspect_ratios_tie_break_to_the_larger_area():
    assert nearest_bucket(100, 100, [(256, 256), (512, 512), (384, 384)]) == (512, 512)


def test_square_bucket_is_resolution_by_resolution():
    assert square_bucket(768) == (768, 768)
