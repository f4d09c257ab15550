"""What a run records and says: TensorBoard's learning rate per parameter group, gradient norm and config,
and a notice when mixed precision cannot take effect."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

from lora_trainer.config import config_from_dict  # noqa: E402
from lora_trainer.models.diffusers_backend import DiffusersBackend  # noqa: E402
from lora_trainer.tiny import tiny_sd_pipeline  # noqa: E402
from lora_trainer.train.events import TrainingEvents  # noqa: E402
from lora_trainer.train.loop import train  # noqa: E402


class _Messages(TrainingEvents):
    def __init__(self):
        self.messages: list[str] = []

    def on_message(self, text: str) -> None:
        self.messages.append(text)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return DiffusersBackend(tiny_sd_pipeline("sd1", seed=0, tokenizer_folder=tmp_path_factory.mktemp("tok")), "cpu")


def _config(dataset, tmp_path, **overrides):
    settings = dict(train_data_dir=dataset, resolution=32, bucket_step=8, lora_rank=4, max_train_steps=2,
                    log_every_n_steps=1, output_dir=tmp_path / "out", logging_dir=tmp_path / "logs")
    return config_from_dict({**settings, **overrides})


def test_tensorboard_has_each_groups_learning_rate_the_gradient_and_weight_norms_and_the_config(backend, shapes_dataset,
                                                                                    tmp_path):
    result = train(_config(shapes_dataset, tmp_path, train_text_encoder=True, unet_lr=3e-4, text_encoder_lr=5e-5,
                           max_grad_norm=None, scale_weight_norms=1.0), backend)
    log = event_accumulator.EventAccumulator(str(result.log_folder), size_guidance={"tensors": 0})
    log.Reload()
    assert [event.value for event in log.Scalars("lr/unet")] == pytest.approx([3e-4, 3e-4])
    assert [event.value for event in log.Scalars("lr/text_encoder")] == pytest.approx([5e-5, 5e-5])
    assert all(event.value > 0 for event in log.Scalars("gradient_norm"))
    assert [event.step for event in log.Scalars("max_norm/largest_norm")] == [1, 2]
    config_text = log.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "text_encoder_lr: 5.0e-05" in config_text


def test_fp16_where_it_has_no_effect_says_so_at_the_start(backend, shapes_dataset, tmp_path):
    events = _Messages()
    train(_config(shapes_dataset, tmp_path, max_train_steps=1, mixed_precision="fp16", logging_dir=None), backend,
          events)
    assert "Note: mixed_precision fp16 has no effect on cpu: this run computes in fp32." in events.messages
