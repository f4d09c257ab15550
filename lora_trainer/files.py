"""Atomic file writes and collision-free output names: nothing is left half-written or overwritten."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it into place.

    A crash or exception inside `write` leaves `path` as it was and removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The file gets the permissions open() gives under the umask, whatever `write` does: mkstemp, and writers
    # such as safetensors >= 0.5 that replace the file themselves, make it 0600, which would hide saved LoRAs
    # from the other users of a shared WebUI.
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp_path.open("xb").close()
        mode = tmp_path.stat().st_mode
        write(tmp_path)
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def unused_path(path: Path) -> Path:
    """`path` if nothing is there yet, else the first free `stem-2.ext`, `stem-3.ext`, ..."""
    path = Path(path)
    candidate, counter = path, 1
    while candidate.exists():
        counter += 1
        candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")
    return candidate
