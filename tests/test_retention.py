"""keep_last_n_saves: only the newest files saved on the way stay, with their state; the final file always."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_trainer.config import config_from_dict
from lora_trainer.errors import UserError
from lora_trainer.train.retention import prune_saves


def _save(folder: Path, stem: str, state: bool = False) -> Path:
    path = folder / f"{stem}.safetensors"
    path.write_bytes(b"lora")
    path.with_suffix(".diffusers.safetensors").write_bytes(b"peft")
    if state:
        path.with_suffix(".state").mkdir()
        (path.with_suffix(".state") / "optimizer.pt").write_bytes(b"state")
    return path


def test_the_oldest_saves_go_with_their_state_and_diffusers_copies(tmp_path):
    saved = [_save(tmp_path, f"x-s00000{step}", state=True) for step in (1, 2, 3)]

    removed = prune_saves(saved, 2, tmp_path / "x.safetensors")

    assert removed == saved[:1]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "x-s000002.diffusers.safetensors", "x-s000002.safetensors", "x-s000002.state",
        "x-s000003.diffusers.safetensors", "x-s000003.safetensors", "x-s000003.state"]


def test_the_final_file_always_stays_and_does_not_count(tmp_path):
    saved = [_save(tmp_path, "x-e0001"), _save(tmp_path, "x-e0002"), _save(tmp_path, "x")]
    assert prune_saves(saved, 1, tmp_path / "x.safetensors") == saved[:1]
    assert (tmp_path / "x.safetensors").is_file() and (tmp_path / "x-e0002.safetensors").is_file()
    assert prune_saves(saved[1:], 5, tmp_path / "x.safetensors") == []


def test_keeping_no_saves_is_refused():
    with pytest.raises(UserError, match="keep_last_n_saves"):
        config_from_dict(dict(keep_last_n_saves=0))
