"""Shared fixtures: the offline CLIP tokenizer, tiny captioned datasets, tiny diffusers models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

# The models are tiny: one thread beats thread contention on small CPUs and shared CI machines.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def concept_dataset(tmp_path_factory) -> Path:
    """The learning tests' concept: 12 magenta shapes captioned "a sks circle" (`measures.CONCEPT`)."""
    from measures import CONCEPT

    from lora_trainer.world import write_concept_dataset

    folder = tmp_path_factory.mktemp("concept")
    write_concept_dataset(folder, *CONCEPT)
    return folder


@pytest.fixture(scope="session")
def concept_lora(tmp_path_factory, tokenizer_folder, concept_dataset):
    """`concept_lora(family)`: the path of a UNet LoRA trained on the concept with `measures.concept_config` on
    that family's learned base, trained once per session for every learning test that starts from it."""
    from measures import concept_config

    from lora_trainer.bases import learned_pipeline
    from lora_trainer.models.diffusers_backend import DiffusersBackend
    from lora_trainer.train.loop import train

    paths: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in paths:
            backend = DiffusersBackend(learned_pipeline(family, tokenizer_folder=tokenizer_folder), "cpu",
                                       model_name=family)
            paths[family] = train(concept_config(concept_dataset, tmp_path_factory.mktemp(family)), backend).saved[-1]
        return paths[family]
    return get


@pytest.fixture(scope="session")
def tokenizer_folder(tmp_path_factory) -> Path:
    """The real CLIP BPE tokenizer files, built once per session from open_clip's vocabulary."""
    from lora_trainer.tiny import write_clip_tokenizer_files

    return write_clip_tokenizer_files(tmp_path_factory.mktemp("clip-tokenizer"))


def write_shapes_dataset(folder: Path, count: int = 4, size: int = 32) -> Path:
    """`count` images of coloured shapes with `.txt` captions in `folder`."""
    colours = ["red", "blue", "green", "orange", "purple", "teal", "black", "yellow"]
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        colour = colours[index % len(colours)]
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        margin = size // 8
        (draw.ellipse if index % 2 else draw.rectangle)((margin, margin, size - margin, size - margin), fill=colour)
        image.save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(f"sks, a {colour} shape")
    return folder


@pytest.fixture
def shapes_dataset(tmp_path) -> Path:
    """Four 32 px captioned images."""
    return write_shapes_dataset(tmp_path / "dataset")
