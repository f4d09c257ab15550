"""What the data options change in what a LoRA learns, judged by the learned tiny SD1 base's pictures:
masks keep a background out of the LoRA, regularisation images keep the class prompt the base's, and the
validation loss finds the step before overtraining."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from measures import CONCEPT, concept_config  # noqa: E402

from lora_trainer.bases import learned_pipeline  # noqa: E402
from lora_trainer.models.diffusers_backend import DiffusersBackend  # noqa: E402
from lora_trainer.train.loop import train  # noqa: E402
from lora_trainer.world import COLOURS, write_concept_dataset  # noqa: E402

SEEDS = range(8)


def _backend(tokenizer_folder) -> DiffusersBackend:
    return DiffusersBackend(learned_pipeline("sd1", tokenizer_folder=tokenizer_folder), "cpu", model_name="sd1")


def _draw(backend: DiffusersBackend, prompt: str, seed: int) -> Image.Image:
    return backend.generate(prompt, "", seed=seed, steps=20, width=32, height=32, guidance_scale=7.5)


def _share_of(colour: str, image: Image.Image) -> float:
    """The share of the picture's pixels near `colour`."""
    pixels = np.asarray(image, dtype=np.float32)
    return float((np.linalg.norm(pixels - np.array(COLOURS[colour], dtype=np.float32), axis=-1) < 90).mean())


def test_validation_loss_falls_then_rises_when_two_images_are_overtrained(tmp_path, tokenizer_folder):
    colour, trigger = CONCEPT
    train_images = tmp_path / "two"
    write_concept_dataset(train_images, colour, trigger, count=2, seed=5)
    held_out = tmp_path / "held-out"
    write_concept_dataset(held_out, colour, trigger, count=6, seed=7)
    config = concept_config(train_images, tmp_path / "out", validation_data_dir=held_out, validate_every_n_steps=25,
                            max_train_steps=150, batch_size=2, learning_rate=2e-2, scheduler="constant",
                            lora_rank=16)
    result = train(config, _backend(tokenizer_folder))
    losses = dict(result.validation_losses)
    print("validation loss by step:", {step: round(loss, 4) for step, loss in losses.items()})
    best = result.best_validation_step
    assert losses[best] == min(losses.values()) and 0 < best < 150
    assert losses[best] < losses[0] and losses[150] > losses[best] * 1.2
