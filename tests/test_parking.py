"""Parking the VAE and frozen text encoders in CPU memory during a run, and restoring them exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_trainer.models.parking import ParkedModules


def _mixed_module() -> nn.Module:
    module = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4).to(torch.float16), nn.Linear(4, 2).to(torch.bfloat16))
    module.register_buffer("scale", torch.arange(3, dtype=torch.float64))
    return module


def _tensors(module: nn.Module) -> list[tuple[int, torch.device, torch.dtype, bytes]]:
    return [(id(tensor), tensor.device, tensor.dtype, tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
            for tensor in [*module.parameters(), *module.buffers()]]


def test_parked_tensors_free_their_memory_and_come_back_as_the_same_objects_with_the_same_bits():
    module = _mixed_module()
    before = _tensors(module)
    with ParkedModules([module], torch.device("cpu")) as parked:
        assert parked.parked
        assert all(tensor.numel() == 0 for tensor in [*module.parameters(), *module.buffers()])
        assert [(tensor.device, tensor.dtype) for tensor in [*module.parameters(), *module.buffers()]] == \
            [(device, dtype) for _, device, dtype, _ in before]
    assert _tensors(module) == before


def test_lent_modules_work_inside_the_block_and_are_parked_again_after_it():
    module = nn.Linear(3, 3)
    inputs = torch.ones(1, 3)
    expected = module(inputs)
    with ParkedModules([module], torch.device("cpu")) as parked:
        with pytest.raises(RuntimeError):
            module(inputs)
        with parked.lent():
            assert torch.equal(module(inputs), expected)
        assert module.weight.numel() == 0
    assert torch.equal(module(inputs), expected)


def test_tensors_on_another_device_than_the_training_one_stay_where_they_are():
    module = nn.Linear(2, 2)
    with ParkedModules([module], torch.device("cuda", 0)) as parked:
        assert not parked.parked and module.weight.numel() == 4


def test_a_module_shared_by_two_parts_is_parked_once():
    shared = nn.Linear(2, 2)
    before = _tensors(shared)
    with ParkedModules([shared, nn.Sequential(shared)], torch.device("cpu")):
        pass
    assert _tensors(shared) == before


def test_a_run_parks_the_cached_vae_and_text_encoder_lends_them_for_samples_and_restores_them(
        shapes_dataset, tmp_path, tokenizer_folder):
    pytest.importorskip("diffusers")
    from lora_trainer.config import config_from_dict
    from lora_trainer.models.diffusers_backend import DiffusersBackend
    from lora_trainer.tiny import tiny_sd_pipeline
    from lora_trainer.train.events import TrainingEvents
    from lora_trainer.train.loop import train

    pipeline = tiny_sd_pipeline("sd1", tokenizer_folder=tokenizer_folder)
    idle = [pipeline.vae, pipeline.text_encoder]
    before = [_tensors(module) for module in idle]
    seen: dict[str, object] = {}

    class Watch(TrainingEvents):
        def on_start(self, plan):
            seen["parked at start"] = all(tensor.numel() == 0 for module in idle for tensor in module.parameters())
            seen["unet kept"] = all(tensor.numel() > 0 for tensor in pipeline.unet.parameters())

        def on_sample(self, step, images, prompts):
            seen["sampled"] = len(images)

    config = config_from_dict(dict(train_data_dir=shapes_dataset, resolution=32, bucket_step=8, lora_rank=4,
                                   batch_size=2, max_train_steps=2, output_dir=tmp_path / "out", logging_dir=None,
                                   sample_prompts=["sks"], sample_steps=2))
    train(config, DiffusersBackend(pipeline, "cpu"), Watch())
    assert seen == {"parked at start": True, "unet kept": True, "sampled": 1}
    assert [_tensors(module) for module in idle] == before
