"""Captions in place: `photo.txt` beside `photo.png`, written atomically, and an optional metadata.csv."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from lora_trainer.files import atomic_write_text, write_new_file

CAPTION_MODES = ("skip", "overwrite", "append")
CAPTION_EXTENSION = ".txt"
_SEPARATOR = ", "


def caption_path(image_path: Path) -> Path:
    """Where the caption of `image_path` lives: same folder, same stem, `.txt`."""
    return image_path.with_suffix(CAPTION_EXTENSION)


def read_caption(image_path: Path) -> str:
    """The caption already beside `image_path`, stripped; "" when there is none.

    Raises `UnicodeDecodeError` when the caption file is not UTF-8 text.
    """
    path = caption_path(image_path)
    if not path.is_file():
        return ""
    return path.read_text(encoding="utf-8-sig").strip()


def compose_caption(generated: str, prefix: str, appended_to: str = "") -> str:
    """The caption to write: the prefix (trigger word) first, then `appended_to` (an existing caption
    being added to), then the generated text, joined by ", ". A prefix already leading `appended_to` is not doubled.
    """
    trigger = prefix.strip().rstrip(",").strip()
    parts = [trigger, _without_leading(appended_to.strip(), trigger), generated.strip()]
    return _SEPARATOR.join(part for part in parts if part)


def write_caption(image_path: Path, caption: str) -> Path:
    """Write `caption` beside `image_path` atomically: a crash never leaves a partial caption file."""
    return atomic_write_text(caption_path(image_path), caption)


def write_metadata_csv(csv_path: Path, captions: dict[Path, str]) -> tuple[Path, Path | None]:
    """Write `filename,prompt` rows for `captions` (image path -> caption) atomically; returns the csv's path
    and, when it replaced a csv with other content, where the old one was kept (`metadata.csv.bak`, ...).

    File names are relative to the csv's folder with "/" separators, as the dataset loader reads them.
    """
    csv_path = Path(csv_path)
    csv_folder = csv_path.resolve().parent
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["filename", "prompt"])
    for image_path in sorted(captions):
        relative_name = Path(os.path.relpath(Path(image_path).resolve(), csv_folder)).as_posix()
        writer.writerow([relative_name, captions[image_path]])
    text = buffer.getvalue()
    old = csv_path.read_bytes() if csv_path.is_file() else None
    backup = None
    if old is not None and old != text.encode("utf-8"):
        backup = write_new_file(csv_path.with_name(csv_path.name + ".bak"), lambda tmp: tmp.write_bytes(old))
    return atomic_write_text(csv_path, text), backup


def _without_leading(caption: str, trigger: str) -> str:
    if trigger and (caption == trigger or caption.startswith(trigger + ",")):
        return caption[len(trigger) :].lstrip(", ")
    return caption
