"""Atomic writes and collision-free names."""

from __future__ import annotations

import os

import pytest

from lora_trainer.files import atomic_write, atomic_write_text, unused_path


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


def test_unused_path_never_names_an_existing_file(tmp_path):
    (tmp_path / "lora.safetensors").write_text("")
    (tmp_path / "lora-2.safetensors").write_text("")
    assert unused_path(tmp_path / "lora.safetensors") == tmp_path / "lora-3.safetensors"
    assert unused_path(tmp_path / "new.safetensors") == tmp_path / "new.safetensors"
