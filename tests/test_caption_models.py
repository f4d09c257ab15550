"""Loading open_clip models: weights files and tags are checked before anything is built or downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_trainer.caption.models import load_open_clip
from lora_trainer.errors import UserError
from lora_trainer.models.base import resolve_device
from tests.caption_models import TINY_CLIP, TINY_COCA, register_tiny_configs, save_tiny_checkpoint

CPU = torch.device("cpu")


def test_a_weights_file_loads_into_its_architecture_with_a_matching_tokenizer(tmp_path: Path) -> None:
    register_tiny_configs(tmp_path)
    bundle = load_open_clip(TINY_CLIP, str(save_tiny_checkpoint(TINY_CLIP, tmp_path / "clip.pt")), CPU)
    assert not bundle.model.training
    assert bundle.tokenizer(["a cat", "a dog"]).shape == (2, bundle.model.context_length)


def test_weights_of_another_architecture_are_a_user_error(tmp_path: Path) -> None:
    register_tiny_configs(tmp_path)
    clip_weights = save_tiny_checkpoint(TINY_CLIP, tmp_path / "clip.pt")
    with pytest.raises(UserError, match="trained with this architecture"):
        load_open_clip(TINY_COCA, str(clip_weights), CPU)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_weights_file_of_random_bytes_is_a_user_error(suffix: str, tmp_path: Path) -> None:
    register_tiny_configs(tmp_path)
    weights = tmp_path / f"clip{suffix}"
    weights.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(UserError, match="Check that the file is whole"):
        load_open_clip(TINY_CLIP, str(weights), CPU)


def test_a_weights_file_the_webuis_safe_loader_refuses_is_a_user_error_that_says_which_files_work(
        tmp_path: Path, monkeypatch) -> None:
    register_tiny_configs(tmp_path)
    weights = save_tiny_checkpoint(TINY_CLIP, tmp_path / "clip.pt")
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: None)  # what the WebUI's torch.load does then
    with pytest.raises(UserError, match=r"safe loader refuses .* \(\.pt, \.pth, \.bin\), not \.safetensors"):
        load_open_clip(TINY_CLIP, str(weights), CPU)


def test_an_unknown_architecture_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no architecture called"):
        load_open_clip("ViT-Nonexistent", "openai", CPU)


def test_the_cpu_device_is_always_available() -> None:
    assert resolve_device("cpu") == CPU


def test_an_unknown_device_is_a_user_error() -> None:
    with pytest.raises(UserError, match="Unknown device"):
        resolve_device("tpu")
