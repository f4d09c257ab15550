"""Per-sample transforms: bucket crops with SDXL crop offsets, tensors in [-1, 1], kohya captions."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.data.transforms import crop_to_bucket, process_caption, to_tensor

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def three_stripes(width: int, height: int) -> Image.Image:
    """Left third red, middle third green, right third blue."""
    image = Image.new("RGB", (width, height), GREEN)
    image.paste(RED, (0, 0, width // 3, height))
    image.paste(BLUE, (width - width // 3, 0, width, height))
    return image


def random_crop_offset(seed: int) -> tuple[int, int]:
    """Where a random 100x100 crop of a 300x100 image starts, for this seed."""
    return crop_to_bucket(Image.new("RGB", (300, 100)), (100, 100), True, random.Random(seed))[1]


# --- crop_to_bucket ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(300, 100), (100, 300), (37, 91), (640, 640), (20, 20)])
@pytest.mark.parametrize("random_crop", [False, True])
def test_crop_is_exactly_the_bucket_size(size, random_crop):
    cropped, _ = crop_to_bucket(Image.new("RGB", size), (64, 96), random_crop, random.Random(0))

    assert cropped.size == (64, 96)


def test_center_crop_keeps_the_middle_of_a_wide_image():
    cropped, crop_top_left = crop_to_bucket(three_stripes(300, 100), (100, 100), False, random.Random(0))

    assert crop_top_left == (0, 100)
    assert [color for _, color in cropped.getcolors()] == [GREEN]


def test_crop_offsets_are_in_the_pixels_of_the_resized_image():
    _, crop_top_left = crop_to_bucket(Image.new("RGB", (100, 400)), (64, 128), False, random.Random(0))

    # 100x400 is scaled to 64x256 to cover 64x128; the centred crop starts 64 rows down.
    assert crop_top_left == (64, 0)


def test_image_already_the_bucket_size_is_returned_uncropped():
    image = three_stripes(96, 64)

    cropped, crop_top_left = crop_to_bucket(image, (96, 64), True, random.Random(0))

    assert crop_top_left == (0, 0)
    assert np.array_equal(np.asarray(cropped), np.asarray(image))


def test_small_image_is_scaled_up_to_cover_the_bucket():
    small = Image.new("RGB", (16, 16), RED)

    cropped, crop_top_left = crop_to_bucket(small, (64, 64), False, random.Random(0))

    assert crop_top_left == (0, 0)
    assert cropped.getpixel((32, 32)) == RED


def test_random_crop_stays_inside_the_resized_image():
    offsets = {random_crop_offset(seed) for seed in range(20)}

    assert all(top == 0 and 0 <= left <= 200 for top, left in offsets)


def test_random_crop_varies_with_the_rng():
    offsets = {random_crop_offset(seed) for seed in range(20)}

    assert len(offsets) > 1


def test_random_crop_is_reproducible_with_the_same_seed():
    image = Image.new("RGB", (300, 200))

    first = crop_to_bucket(image, (64, 64), True, random.Random(7))[1]
    second = crop_to_bucket(image, (64, 64), True, random.Random(7))[1]

    assert first == second


# --- to_tensor -----------------------------------------------------------------------------------


def test_tensor_is_float32_channels_first():
    tensor = to_tensor(Image.new("RGB", (24, 16)), flip=False)

    assert tensor.dtype == torch.float32
    assert tensor.shape == (3, 16, 24)


def test_tensor_maps_black_to_minus_one_and_white_to_one():
    image = Image.new("RGB", (16, 8), (0, 0, 0))
    image.paste((255, 255, 255), (8, 0, 16, 8))

    tensor = to_tensor(image, flip=False)

    assert torch.all(tensor[:, :, :8] == -1.0)
    assert torch.all(tensor[:, :, 8:] == 1.0)


def test_tensor_keeps_the_channel_order():
    tensor = to_tensor(Image.new("RGB", (8, 8), RED), flip=False)

    assert tensor[:, 0, 0].tolist() == [1.0, -1.0, -1.0]


def test_flip_mirrors_left_and_right():
    tensor = to_tensor(three_stripes(30, 10), flip=True)

    assert tensor[:, 0, 0].tolist() == [-1.0, -1.0, 1.0]
    assert tensor[:, 0, -1].tolist() == [1.0, -1.0, -1.0]


# --- process_caption -----------------------------------------------------------------------------

CAPTION = "sks dog, sitting, grass, sunny, park, looking at viewer, from side, smile"


def test_caption_is_unchanged_without_shuffle_or_dropout():
    caption = "sks dog,sitting ,grass"

    assert process_caption(caption, False, 1, 0.0, random.Random(0)) == caption


def test_shuffle_keeps_the_first_keep_tokens_in_place():
    for seed in range(10):
        tokens = process_caption(CAPTION, True, 2, 0.0, random.Random(seed)).split(", ")

        assert tokens[:2] == ["sks dog", "sitting"]


def test_shuffle_keeps_every_token():
    shuffled = process_caption(CAPTION, True, 1, 0.0, random.Random(3))

    assert sorted(shuffled.split(", ")) == sorted(CAPTION.split(", "))


def test_shuffle_changes_the_order_of_the_other_tokens():
    orders = {process_caption(CAPTION, True, 1, 0.0, random.Random(seed)) for seed in range(10)}

    assert len(orders) > 1


def test_shuffled_tokens_are_stripped_and_joined_with_comma_space():
    assert process_caption(" a ,b,, c ", True, 3, 0.0, random.Random(0)) == "a, b, c"


def test_dropout_rate_one_always_empties_the_caption():
    assert all(process_caption(CAPTION, True, 1, 1.0, random.Random(seed)) == "" for seed in range(10))


def test_dropout_rate_zero_never_empties_the_caption():
    assert all(process_caption(CAPTION, False, 0, 0.0, random.Random(seed)) == CAPTION for seed in range(10))


def test_dropout_empties_about_the_given_share_of_captions():
    rng = random.Random(0)

    dropped = sum(process_caption(CAPTION, False, 0, 0.25, rng) == "" for _ in range(1000))

    assert 200 <= dropped <= 300


def test_caption_processing_is_reproducible_with_the_same_seed():
    first = process_caption(CAPTION, True, 1, 0.5, random.Random(42))
    second = process_caption(CAPTION, True, 1, 0.5, random.Random(42))

    assert first == second
