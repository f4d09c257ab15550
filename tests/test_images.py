"""load_rgb_image: every odd file becomes an upright 8-bit RGB image or an UnreadableImage with the reason."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.data.images import (
    UnreadableImage,
    image_size,
    is_image_file,
    load_rgb_image,
    thumbnail_file,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def noise_image(width: int = 32, height: int = 32) -> Image.Image:
    """Random pixels, so that compressed data fills the whole file and truncation hits pixel data."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def truncate_to_half(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def assert_close(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 8) -> None:
    assert all(abs(got - want) <= tolerance for got, want in zip(pixel, expected, strict=True)), (
        pixel,
        expected,
    )


def test_plain_rgb_png_loads_unchanged(tmp_path):
    path = tmp_path / "plain.png"
    noise_image().save(path)

    image = load_rgb_image(path)

    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(noise_image()))


def test_truncated_png_is_unreadable(tmp_path):
    path = tmp_path / "cut.png"
    noise_image().save(path)

    with pytest.raises(UnreadableImage, match="truncated"):
        load_rgb_image(truncate_to_half(path))


def test_truncated_jpeg_is_unreadable(tmp_path):
    path = tmp_path / "cut.jpg"
    noise_image().save(path, quality=95)

    with pytest.raises(UnreadableImage, match="truncated"):
        load_rgb_image(truncate_to_half(path))


def test_empty_file_is_unreadable(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")

    with pytest.raises(UnreadableImage, match="0 bytes"):
        load_rgb_image(path)


def test_text_file_named_png_is_unreadable(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n", encoding="utf-8")

    with pytest.raises(UnreadableImage, match="not an image"):
        load_rgb_image(path)


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(UnreadableImage, match="not a file"):
        load_rgb_image(tmp_path / "gone.png")


def test_tiny_image_is_unreadable(tmp_path):
    path = tmp_path / "tiny.png"
    Image.new("RGB", (4, 16), RED).save(path)

    with pytest.raises(UnreadableImage, match="too small"):
        load_rgb_image(path)


def test_image_over_pillows_pixel_limit_is_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (32, 32), RED).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)

    with pytest.raises(UnreadableImage, match="too many pixels"):
        load_rgb_image(path)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)

    image = load_rgb_image(path)

    assert image.mode == "RGB"
    assert_close(image.getpixel((8, 8)), RED)


def test_16_bit_png_is_scaled_to_8_bit_gray(tmp_path):
    path = tmp_path / "deep.png"
    deep = Image.new("I;16", (16, 16), 0)
    deep.paste(65535, (0, 0, 8, 16))
    deep.paste(32896, (8, 0, 16, 16))
    deep.save(path)

    image = load_rgb_image(path)

    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((12, 0)) == (128, 128, 128)


def test_transparent_png_is_composited_on_white(tmp_path):
    path = tmp_path / "alpha.png"
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 8, 16))
    rgba.save(path)

    image = load_rgb_image(path)

    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == BLUE
    assert image.getpixel((12, 0)) == WHITE


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    path = tmp_path / "rotated.jpg"
    stored = Image.new("RGB", (32, 16), BLUE)
    stored.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show the stored pixels rotated 90 degrees clockwise
    stored.save(path, exif=exif.tobytes(), quality=95)

    image = load_rgb_image(path)

    assert image.size == (16, 32)
    assert_close(image.getpixel((8, 4)), RED)
    assert_close(image.getpixel((8, 28)), BLUE)


def test_animated_gif_gives_its_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    first, second = Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)

    image = load_rgb_image(path)

    assert image.mode == "RGB"
    assert image.getpixel((8, 8)) == RED


def test_image_size_reports_the_upright_size_of_an_exif_rotated_jpeg(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (32, 16), RED).save(path, exif=exif.tobytes())

    assert image_size(path) == (16, 32)


@pytest.mark.parametrize("name", ["a.png", "b.JPG", "c.jpeg", "d.webp", "e.bmp", "f.gif", "g.tif", "h.TIFF"])
def test_image_extensions_are_recognised_in_any_case(name):
    assert is_image_file(Path(name))


@pytest.mark.parametrize("name", ["caption.txt", "metadata.csv", "notes.json", ".hidden.png", "png"])
def test_other_files_and_hidden_images_are_not_image_files(name):
    assert not is_image_file(Path(name))


def test_thumbnails_are_small_jpegs_cached_until_the_image_changes(tmp_path):
    source = tmp_path / "photo.png"
    Image.new("RGB", (1000, 600), "red").save(source)
    thumbnail = thumbnail_file(source, tmp_path / "thumbs")
    with Image.open(thumbnail) as opened:
        assert opened.format == "JPEG" and opened.size == (256, 154)
    written = thumbnail.stat().st_mtime_ns
    assert thumbnail_file(source, tmp_path / "thumbs") == thumbnail
    assert thumbnail.stat().st_mtime_ns == written
    Image.new("RGB", (500, 1000), "blue").save(source)
    os.utime(source, ns=(written + 10**9, written + 10**9))
    changed = thumbnail_file(source, tmp_path / "thumbs")
    assert changed != thumbnail
    with Image.open(changed) as opened:
        assert opened.size == (128, 256)


def test_a_large_jpeg_is_thumbnailed_upright_from_a_reduced_decode(tmp_path):
    source = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.new("RGB", (2400, 1600), "green").save(source, exif=exif)
    with Image.open(thumbnail_file(source, tmp_path / "thumbs")) as opened:
        assert opened.size == (171, 256)


def test_an_unreadable_image_has_no_thumbnail_but_the_reason_the_trainer_skips_it(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(UnreadableImage, match="not an image Pillow can read"):
        thumbnail_file(broken, tmp_path / "thumbs")
    assert not (tmp_path / "thumbs").exists() or not any((tmp_path / "thumbs").iterdir())
