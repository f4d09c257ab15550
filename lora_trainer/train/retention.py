"""Keeping only the newest saves of a run: `keep_last_n_saves`."""

from __future__ import annotations

import shutil
from pathlib import Path


def prune_saves(saved: list[Path], keep: int, final_path: Path) -> list[Path]:
    """Delete all but the newest `keep` of the files `saved` on the way (in saving order; `final_path` never
    counts), with their `.state` folders and diffusers copies. Returns the deleted LoRA files, oldest first."""
    on_the_way = [path for path in saved if path != final_path]
    removed = on_the_way[:max(0, len(on_the_way) - keep)]
    for path in removed:
        path.unlink(missing_ok=True)
        path.with_suffix(".diffusers.safetensors").unlink(missing_ok=True)
        shutil.rmtree(path.with_suffix(".state"), ignore_errors=True)
    return removed
