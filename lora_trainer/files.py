"""Atomic file writes and collision-free output names: nothing is left half-written or overwritten."""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it into place.

    A crash or exception inside `write` leaves `path` as it was and removes the temporary file.
    """
    path = Path(path)
    with _written_temporary(path, write) as tmp_path:
        os.replace(tmp_path, path)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_new_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Like `atomic_write`, but never replaces a file: the result goes to `path`, or to the first free
    `stem-2.ext`, `stem-3.ext`, ... when that is taken. Returns the path written.

    The name is claimed atomically (a hard link, or an exclusive create where the file system has no links),
    so two processes saving under one name at once both keep their file.
    """
    path = Path(path)
    with _written_temporary(path, write) as tmp_path:
        return next(candidate for candidate in _numbered(path) if _claim(tmp_path, candidate))


def write_new_folder(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_folder)` on a temporary folder beside `path`, then give it the name `path`, or the first
    free `path-2`, `path-3`, ... Never replaces anything; returns the folder written.

    The name is claimed atomically (an exclusive mkdir, then a rename onto that empty folder), so a reader never
    sees a half-written folder under its final name.
    """
    path = Path(path)
    tmp_folder = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    tmp_folder.mkdir(parents=True)
    try:
        write(tmp_folder)
        folder = next(candidate for candidate in _numbered(path) if _claim_folder(candidate))
        try:
            os.replace(tmp_folder, folder)
        except OSError:  # Windows cannot rename onto a folder: free the claimed name just before taking it
            folder.rmdir()
            os.rename(tmp_folder, folder)
        return folder
    finally:
        shutil.rmtree(tmp_folder, ignore_errors=True)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files and folders that writers of this package killed mid-write left in `folder` and
    its `*.state` folders, and the `*.state` folders that held nothing else; return what was removed.

    Only names of our exact pattern are touched, and only when their writer is gone: on POSIX its process
    no longer exists and the file is over a minute old (a writer on another machine sharing the folder
    keeps touching its file); elsewhere, when the file is over a day old.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    state_folders = [path for path in folder.glob("*.state") if path.is_dir()]
    for candidate in [*folder.iterdir(), *(path for state in state_folders for path in state.iterdir())]:
        match = _TEMPORARY_NAME.fullmatch(candidate.name)
        if match and _writer_is_gone(int(match["pid"]), candidate):
            if candidate.is_dir():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                candidate.unlink(missing_ok=True)
            removed.append(candidate)
    for state in state_folders:
        if any(path.parent == state for path in removed):
            with suppress(OSError):  # not empty: it holds more than our leftovers
                state.rmdir()
                removed.append(state)
    return removed


_TEMPORARY_NAME = re.compile(r"\..+\.(?P<pid>\d+)-[0-9a-f]{32}\.tmp")


def _writer_is_gone(pid: int, path: Path) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:  # its writer has just finished
        return False
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows: age alone decides there
        return age > 24 * 3600
    if age < 60:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it runs, under another user
        pass
    return False


def _numbered(path: Path) -> Iterator[Path]:
    yield path
    counter = 2
    while True:
        yield path.with_name(f"{path.stem}-{counter}{path.suffix}")
        counter += 1


def _claim_folder(name: Path) -> bool:
    """Create the empty folder `name` unless the name is taken; True when it was free."""
    try:
        name.mkdir()
    except FileExistsError:
        return False
    return True


def _claim(tmp_path: Path, name: Path) -> bool:
    """Give the temporary file's content the name `name` unless it is taken; True when it was free."""
    try:
        os.link(tmp_path, name)
    except FileExistsError:
        return False
    except OSError:  # no hard links here (FAT, exFAT): reserve the name, then fill it
        try:
            name.open("xb").close()
        except FileExistsError:
            return False
        os.replace(tmp_path, name)
    return True


@contextmanager
def _written_temporary(path: Path, write: Callable[[Path], None]) -> Iterator[Path]:
    """The temporary file beside `path` holding what `write` wrote; removed on leaving, whatever happened."""
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # The file gets the permissions open() gives under the umask, whatever `write` does: mkstemp, and
        # writers such as safetensors >= 0.5 that replace the file themselves, make it 0600, which would hide
        # saved LoRAs from the other users of a shared WebUI.
        tmp_path.open("xb").close()
        mode = tmp_path.stat().st_mode
        write(tmp_path)
        os.chmod(tmp_path, mode)
        yield tmp_path
    finally:
        tmp_path.unlink(missing_ok=True)
