"""Robust image loading: every odd file either becomes a plain RGB image or a reason to skip it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_trainer.files import atomic_write

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
THUMBNAIL_SIDE = 256


class UnreadableImage(Exception):
    """An image file that cannot be used for training; the message is the reason."""


def is_image_file(path: Path) -> bool:
    """True when the file name has an image extension (the content is checked on load)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def load_rgb_image(path: Path, at_least: int | None = None) -> Image.Image:
    """Open `path` as an upright 8-bit RGB image, or raise `UnreadableImage` with the reason.

    Handles EXIF rotation, CMYK, palette, 16-bit and float images, alpha (composited on white)
    and animations (the first frame is used). With `at_least`, a JPEG may be decoded at a reduced scale
    that keeps both sides at least that long (several times faster, for previews).
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableImage("not a file")
    if path.stat().st_size == 0:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        with Image.open(path) as opened:
            opened.seek(0)
            if at_least is not None:
                opened.draft("RGB", (at_least, at_least))
            opened.load()
            image = ImageOps.exif_transpose(opened)
            image = _to_rgb(image)
    except UnidentifiedImageError:
        raise UnreadableImage("not an image Pillow can read") from None
    except Image.DecompressionBombError:
        raise UnreadableImage("too many pixels (Pillow refuses it as a decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UnreadableImage(f"damaged or truncated image ({error})") from None
    if image.width < 8 or image.height < 8:
        raise UnreadableImage(f"too small ({image.width}x{image.height})")
    return image


def thumbnail_file(path: Path, folder: Path, side: int = THUMBNAIL_SIDE) -> Path:
    """A JPEG of `path` at most `side` pixels long, cached in `folder` under a name keyed by the file's path,
    size and modification time. Raises `UnreadableImage` (with the trainer's reason) when it cannot be read."""
    path = Path(path)
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{side}".encode()).hexdigest()
    thumbnail = Path(folder) / f"{key}.jpg"
    if thumbnail.is_file():
        return thumbnail
    image = load_rgb_image(path, at_least=side)
    image.thumbnail((side, side))
    return atomic_write(thumbnail, lambda tmp: image.save(tmp, format="JPEG", quality=85))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF rotation, read from the header only."""
    with Image.open(path) as opened:
        width, height = opened.size
        orientation = opened.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = _high_depth_to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = float(values.min()), float(values.max())
        values = (values - low) / (high - low or 1.0) * 255.0
    else:
        values = values / 257.0  # 16-bit full range onto 8-bit full range
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")
