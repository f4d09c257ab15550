"""Atomic writes and collision-free names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_trainer.files import atomic_write, atomic_write_text, write_new_file


def test_an_atomic_write_gets_the_permissions_of_a_plainly_written_file(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert atomic_write_text(tmp_path / "atomic.txt", "x").stat().st_mode == plain.stat().st_mode

    def private_writer(tmp):  # as safetensors >= 0.5 does: its own 0600 file renamed over the target
        private = tmp.with_name("private")
        private.write_text("x")
        os.chmod(private, 0o600)
        os.replace(private, tmp)

    assert atomic_write(tmp_path / "lora.safetensors", private_writer).stat().st_mode == plain.stat().st_mode


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = atomic_write_text(tmp_path / "file.txt", "old")

    def failing(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["file.txt"]


def test_a_new_file_never_replaces_an_existing_one_but_takes_the_next_free_number(tmp_path):
    (tmp_path / "lora.safetensors").write_text("first")
    (tmp_path / "lora-2.safetensors").write_text("second")
    written = write_new_file(tmp_path / "lora.safetensors", lambda tmp: tmp.write_text("third"))
    assert written == tmp_path / "lora-3.safetensors" and written.read_text() == "third"
    assert (tmp_path / "lora.safetensors").read_text() == "first"
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "lora-2.safetensors", "lora-3.safetensors", "lora.safetensors"]


def test_two_processes_saving_under_one_name_at_once_both_keep_every_file(tmp_path):
    saver = ("import sys; from pathlib import Path; from lora_trainer.files import write_new_file\n"
             "for index in range(150):\n"
             "    write_new_file(Path(sys.argv[1]) / 'lora.safetensors',\n"
             "                   lambda tmp: tmp.write_text(f'{sys.argv[2]}{index}'))\n")
    repository = Path(__file__).resolve().parent.parent
    savers = [subprocess.Popen([sys.executable, "-c", saver, str(tmp_path), tag], cwd=repository)
              for tag in ("a", "b")]
    assert [process.wait(timeout=120) for process in savers] == [0, 0]
    contents = sorted(path.read_text() for path in tmp_path.iterdir())
    assert contents == sorted(f"{tag}{index}" for tag in ("a", "b") for index in range(150))
