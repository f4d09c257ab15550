"""Saves that cannot fail silently: when the output folder cannot take a file (disk full, folder gone or
read-only), the file goes to a rescue folder and the user is told where it is."""

from __future__ import annotations

import errno
import tempfile
from collections.abc import Callable
from pathlib import Path

from lora_trainer.errors import UserError


def rescue_folders() -> list[Path]:
    """Where a save goes when its own folder cannot take it, in order of preference."""
    return [Path.home() / "lora-trainer-rescue", Path(tempfile.gettempdir()) / "lora-trainer-rescue"]


def save_or_rescue(write: Callable[[Path], Path], folder: Path, what: str, last_saved: Path | None) -> Path:
    """Return `write(folder)` (the path it saved). If that fails with an OSError, call `write` on a rescue
    folder instead and raise a `UserError` that says what went wrong and where `what` now is."""
    try:
        return write(folder)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            problem = f"the disk holding {folder} is full"
        else:
            problem = f"{folder} cannot take the file ({error.strerror or error})"
    for rescue in rescue_folders():
        try:
            rescued = write(rescue)
        except OSError:
            continue
        raise UserError(f"could not save {what}: {problem}. They are kept in {rescued} instead; fix output_dir "
                        "(free some space, or choose a writable folder) and move them there")
    last = f"the last file saved is {last_saved}" if last_saved else "nothing of this run was saved"
    raise UserError(f"could not save {what}: {problem}, and no rescue folder "
                    f"({', '.join(map(str, rescue_folders()))}) could take it either; {last}")
