"""Before a run: every path it reads exists and every folder it writes can take a file, so that a run never
trains for hours to fail at its first save."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lora_trainer.config import TrainConfig
from lora_trainer.errors import UserError


def check_run_paths(config: TrainConfig) -> None:
    """Raise a `UserError` naming the config key and what to do for the first path the run could not use.
    Nothing is created."""
    inputs = (("train_data_dir", Path.is_dir, "folder"), ("metadata_path", Path.is_file, "file"),
              ("init_lora_weights", Path.is_file, "file"), ("resume", Path.is_dir, "state folder"),
              ("mask_dir", Path.is_dir, "folder"), ("reg_data_dir", Path.is_dir, "folder"),
              ("validation_data_dir", Path.is_dir, "folder"))
    values = config.flat()
    generates_reg_images = bool(values["class_prompt"])
    for key, exists, kind in inputs:
        path = values[key]
        if key == "reg_data_dir" and generates_reg_images:
            continue  # the class images are written there: checked as an output folder below
        if path is not None and not exists(path):
            raise UserError(f"{key} {path} does not exist or is not a {kind}: fix the path")
    for key in ("output_dir", "logging_dir", *(("reg_data_dir",) if generates_reg_images else ())):
        folder = values[key]
        if folder is not None:
            check_writable_folder(folder, key)


def check_writable_folder(folder: Path, key: str) -> None:
    """Raise a `UserError` saying why, unless a file can be written in `folder` (once it is created)."""
    folder = Path(folder)
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        problem = "is a file, not a folder" if existing == folder else f"cannot be created: {existing} is a file"
        raise UserError(f"{key} {folder} {problem}; choose another {key}, or move that file away")
    try:
        if existing == folder:
            tempfile.TemporaryFile(dir=folder).close()
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"{existing} is not writable")
    except OSError as error:
        raise UserError(f"{key} {folder} cannot be written ({error.strerror or error}): choose another {key}, "
                        "or fix its permissions") from None
