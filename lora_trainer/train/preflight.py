"""Before a run: every path it reads exists and every folder it writes can take a file, so that a run never
trains for hours to fail at its first save."""

from __future__ import annotations

import tempfile
from pathlib import Path

from lora_trainer.config import TrainConfig
from lora_trainer.errors import UserError


def check_run_paths(config: TrainConfig) -> None:
    """Raise a `UserError` naming the config key and what to do for the first path the run could not use;
    creates the output and logging folders."""
    inputs = (("train_data_dir", Path.is_dir, "folder"), ("metadata_path", Path.is_file, "file"),
              ("init_lora_weights", Path.is_file, "file"), ("resume", Path.is_dir, "state folder"))
    for key, exists, kind in inputs:
        path = getattr(config, key)
        if path is not None and not exists(path):
            raise UserError(f"{key} {path} is not an existing {kind}: fix the path")
    for key in ("output_dir", "logging_dir"):
        folder = getattr(config, key)
        if folder is not None:
            check_writable_folder(folder, key)


def check_writable_folder(folder: Path, key: str) -> None:
    """Create `folder` if needed and make sure a file can be written in it, or raise a `UserError` saying why."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{key} {folder} is a file, not a folder: choose another {key}, or move that file away")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise UserError(f"{key} {folder} cannot be written ({error.strerror or error}): choose another {key}, "
                        "or fix its permissions") from None
