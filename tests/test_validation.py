"""The validation loss: measured on held-out images with fixed noise and timesteps, so that it repeats."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from safetensors import safe_open  # noqa: E402

from lora_trainer.config import config_from_dict  # noqa: E402
from lora_trainer.models.diffusers_backend import DiffusersBackend  # noqa: E402
from lora_trainer.tiny import tiny_sd_pipeline  # noqa: E402
from lora_trainer.train.loop import train  # noqa: E402


def _run(dataset, output_dir, **overrides):
    settings = dict(train_data_dir=dataset, resolution=32, bucket_step=8, lora_rank=4, learning_rate=2e-3,
                    batch_size=2, max_train_steps=6, validation_split=0.5, validate_every_n_steps=2,
                    save_every_n_steps=3, output_dir=output_dir, logging_dir=None, log_every_n_steps=1)
    settings.update(overrides)
    backend = DiffusersBackend(tiny_sd_pipeline("sd1", seed=0, tokenizer_folder=output_dir / "tokenizer"), "cpu")
    return train(config_from_dict(settings), backend)


def test_the_same_run_twice_measures_the_same_validation_losses(shapes_dataset, tmp_path):
    first = _run(shapes_dataset, tmp_path / "first")
    again = _run(shapes_dataset, tmp_path / "again")
    assert first.validation_losses == again.validation_losses
    assert [step for step, _ in first.validation_losses] == [0, 2, 3, 4, 6]  # every 2 steps and at each save
    assert len({loss for _, loss in first.validation_losses}) > 1  # the LoRA changes what it measures


def test_each_saved_file_records_its_validation_loss_and_the_best_step_is_the_lowest(shapes_dataset, tmp_path):
    result = _run(shapes_dataset, tmp_path / "run")
    measured = dict(result.validation_losses)
    for path, step in zip(result.saved, (3, 6)):
        with safe_open(str(path), "pt") as file:
            assert float(file.metadata()["lora_trainer_validation_loss"]) == measured[step]
    assert measured[result.best_validation_step] == min(measured.values())


def test_the_validation_loss_goes_to_tensorboard_beside_the_training_loss(shapes_dataset, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _run(shapes_dataset, tmp_path / "run", logging_dir=tmp_path / "logs")
    events = EventAccumulator(str(next((tmp_path / "logs").iterdir())))
    events.Reload()
    logged = events.Scalars("loss/validation")
    assert [event.step for event in logged] == [step for step, _ in result.validation_losses]
    assert [event.value for event in logged] == pytest.approx([loss for _, loss in result.validation_losses])
    assert "loss/train" in events.Tags()["scalars"]
