"""Loss masks: which part of each training image the loss counts, from a mask file or the image's alpha.

A mask is a grey image: white counts fully, black not at all, grey in between. It comes from the file
`name.mask.png` beside `name.png`, or `name.png` in a separate mask folder, or else the image's own alpha
channel (opaque counts). An image without any of them counts everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from lora_trainer.data.images import IMAGE_EXTENSIONS, UnreadableImage

MASK_SUFFIX = ".mask"


def is_mask_file(path: Path) -> bool:
    """True for `name.mask.png` and the like: a mask beside its image, never a training image itself."""
    return Path(path).stem.lower().endswith(MASK_SUFFIX)


def mask_file_for(image_path: Path, mask_dir: Path | None) -> Path | None:
    """The mask file of `image_path`: `mask_dir/name.<ext>` when a mask folder is given, else
    `name.mask.<ext>` beside the image; None when there is none."""
    image_path = Path(image_path)
    folder, stem = (Path(mask_dir), image_path.stem) if mask_dir is not None else \
        (image_path.parent, image_path.stem + MASK_SUFFIX)
    for extension in sorted(IMAGE_EXTENSIONS):
        candidate = folder / f"{stem}{extension}"
        if candidate.is_file():
            return candidate
    return None


def load_mask(image_path: Path, mask_path: Path | None) -> Image.Image | None:
    """The mask of an image as an 8-bit grey image the size of the (upright) image, or None when the image
    has neither a mask file nor an alpha channel. Raises `UnreadableImage` for a mask file that cannot be read."""
    with Image.open(image_path) as opened:
        image = ImageOps.exif_transpose(opened)
        size = image.size
        if mask_path is None:
            if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
                return None
            return image.convert("RGBA").getchannel("A")
    try:
        with Image.open(mask_path) as opened:
            mask = ImageOps.exif_transpose(opened).convert("L")
    except (OSError, ValueError) as error:
        raise UnreadableImage(f"its mask {Path(mask_path).name} cannot be read ({error})") from None
    return mask if mask.size == size else mask.resize(size, Image.BILINEAR)


def mask_tensor(mask: Image.Image, flip: bool) -> torch.Tensor:
    """A mask already fitted to its bucket as a (1, height, width) uint8 tensor, mirrored when `flip`."""
    pixels = torch.from_numpy(np.array(mask, dtype=np.uint8))[None]
    return pixels.flip(-1) if flip else pixels


def mask_on_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """uint8 masks ([B, 1, H, W]) as weights in [0, 1] on a coarser grid (the latents'): each cell holds the mean
    of the pixels it covers."""
    return F.adaptive_avg_pool2d(masks.float() / 255.0, grid)


def mask_overlay(image_path: Path, mask_dir: Path | None, max_side: int = 512) -> Image.Image | None:
    """The image (at most `max_side` pixels a side) with what its mask leaves out tinted dark red, for the
    caption editor; None when the image has no mask."""
    mask = load_mask(image_path, mask_file_for(image_path, mask_dir))
    if mask is None:
        return None
    with Image.open(image_path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    image.thumbnail((max_side, max_side))
    ignored = Image.new("RGB", image.size, (96, 0, 0))
    return Image.composite(image, Image.blend(image, ignored, 0.7), mask.resize(image.size, Image.BILINEAR))
