"""Latents and text-encoder outputs kept on disk: the next run reads them instead of encoding, a changed image,
caption or encoder is encoded again, and the run trains exactly as without the cache."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_trainer.config import config_from_dict
from lora_trainer.data.dataset import TrainingData
from lora_trainer.data.disk_cache import CACHE_FOLDER, DiskCache
from lora_trainer.data.scan import scan_dataset


class _CountingEncoder:
    """A stand-in VAE (8x average pooling) that counts the images it encodes."""

    def __init__(self):
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += pixels.shape[0]
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled[:, :1]], dim=1)


def _folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, colour in (("a", "red"), ("b", "blue"), ("c", "green")):
        Image.new("RGB", (32, 32), colour).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(name)
    return folder


def _cache(folder, fingerprint: str, encoder: _CountingEncoder, flip_aug: bool = False) -> tuple[int, TrainingData]:
    config = config_from_dict(dict(train_data_dir=folder, resolution=32, bucket_step=8, flip_aug=flip_aug,
                                   cache_latents_to_disk=True))
    data = TrainingData(scan_dataset(folder), config, latent_scale=8)
    return data.cache_latents(encoder, disk=DiskCache(fingerprint)), data


def test_a_second_run_reads_the_latents_instead_of_encoding(tmp_path):
    folder = _folder(tmp_path)
    first_encoder, again_encoder = _CountingEncoder(), _CountingEncoder()
    encoded, first = _cache(folder, "vae-1", first_encoder)
    assert encoded == 3 and first_encoder.images == 3
    encoded, again = _cache(folder, "vae-1", again_encoder)
    assert encoded == 0 and again_encoder.images == 0
    assert all(torch.equal(again.latent_cache[key], latents) for key, latents in first.latent_cache.items())
    assert len(list((folder / CACHE_FOLDER).iterdir())) == 3
    assert [record.path.name for record in scan_dataset(folder).records] == ["a.png", "b.png", "c.png"]


def test_a_changed_image_or_another_vae_is_encoded_again(tmp_path):
    folder = _folder(tmp_path)
    _cache(folder, "vae-1", _CountingEncoder())
    Image.new("RGB", (32, 32), "white").save(folder / "b.png")
    os.utime(folder / "b.png", (1, 1))  # the same time as before would not matter: the content decides
    assert _cache(folder, "vae-1", _CountingEncoder())[0] == 1
    assert _cache(folder, "vae-2", _CountingEncoder())[0] == 3


def test_flipped_latents_are_kept_with_their_image(tmp_path):
    folder = _folder(tmp_path)
    _cache(folder, "vae-1", _CountingEncoder(), flip_aug=True)
    entries = list((folder / CACHE_FOLDER).iterdir())
    assert len(entries) == 3 and load_file(str(entries[0]))["latents"].shape[0] == 2
    assert _cache(folder, "vae-1", _CountingEncoder(), flip_aug=True)[0] == 0


def test_a_damaged_entry_is_encoded_again(tmp_path):
    folder = _folder(tmp_path)
    _cache(folder, "vae-1", _CountingEncoder())
    next((folder / CACHE_FOLDER).iterdir()).write_bytes(b"not safetensors")
    assert _cache(folder, "vae-1", _CountingEncoder())[0] == 1


def test_the_disk_cache_needs_the_latent_cache():
    from lora_trainer.errors import UserError

    with pytest.raises(UserError, match="turn on cache_latents"):
        config_from_dict({"cache_latents_to_disk": True, "cache_latents": False})


def test_a_run_from_the_disk_cache_trains_bit_for_bit_as_one_without_it(shapes_dataset, tmp_path):
    pytest.importorskip("diffusers")
    from lora_trainer.models.diffusers_backend import DiffusersBackend
    from lora_trainer.tiny import tiny_sd_pipeline
    from lora_trainer.train.loop import train

    def run(name: str, **overrides):
        backend = DiffusersBackend(tiny_sd_pipeline("sd1", seed=0, tokenizer_folder=tmp_path / "tokenizer"), "cpu")
        config = config_from_dict(dict(train_data_dir=shapes_dataset, resolution=32, bucket_step=8, lora_rank=4,
                                       learning_rate=2e-3, batch_size=2, max_train_steps=3, logging_dir=None,
                                       output_dir=tmp_path / name, **overrides))
        return load_file(str(train(config, backend).saved[-1]))

    both = dict(cache_latents_to_disk=True, cache_text_encoder_outputs_to_disk=True)
    without = run("without")
    writing = run("writing", **both)
    reading = run("reading", **both)
    entries = [path.name for path in (shapes_dataset / CACHE_FOLDER).iterdir()]
    assert len(entries) == 4 + 4 and sum(name.startswith("text-") for name in entries) == 4  # 4 captions
    for name, tensor in without.items():
        assert torch.equal(tensor, writing[name]) and torch.equal(tensor, reading[name]), name


def test_a_second_run_reads_the_captions_outputs_and_encodes_a_changed_caption_again(shapes_dataset, tmp_path):
    pytest.importorskip("diffusers")
    from lora_trainer.models.diffusers_backend import DiffusersBackend
    from lora_trainer.tiny import tiny_sd_pipeline
    from lora_trainer.train.events import TrainingEvents
    from lora_trainer.train.loop import train

    class Messages(TrainingEvents):
        def __init__(self):
            self.lines = []

        def on_message(self, text: str) -> None:
            self.lines.append(text)

    runs = []

    def encoded(seed: int = 0) -> str:
        runs.append(seed)
        backend = DiffusersBackend(tiny_sd_pipeline("sd1", seed=seed, tokenizer_folder=tmp_path / "tokenizer"), "cpu")
        config = config_from_dict(dict(train_data_dir=shapes_dataset, resolution=32, bucket_step=8, lora_rank=4,
                                       max_train_steps=1, logging_dir=None, output_dir=tmp_path / f"out{len(runs)}",
                                       cache_text_encoder_outputs_to_disk=True))
        events = Messages()
        train(config, backend, events)
        return next(line for line in events.lines if line.startswith("Text-encoder outputs"))

    assert encoded() == "Text-encoder outputs: 0 read from the disk cache, 4 encoded."
    assert encoded() == "Text-encoder outputs: 4 read from the disk cache, 0 encoded."
    caption = next(shapes_dataset.glob("*.txt"))
    caption.write_text(caption.read_text() + ", again")
    assert encoded() == "Text-encoder outputs: 3 read from the disk cache, 1 encoded."
    assert encoded(seed=1) == "Text-encoder outputs: 0 read from the disk cache, 4 encoded."  # other weights


def test_the_text_disk_cache_needs_a_frozen_text_encoder():
    from lora_trainer.errors import UserError

    with pytest.raises(UserError, match="cache_text_encoder_outputs_to_disk needs the text-encoder cache"):
        config_from_dict({"cache_text_encoder_outputs_to_disk": True, "train_text_encoder": True})


def test_an_encoders_fingerprint_reads_scalar_parameters_and_changes_with_them():
    # The WebUI's text encoders hold 0-dimensional tensors (OpenCLIP's logit scale), which once failed to hash.
    from lora_trainer.models.base import module_fingerprint

    encoder = torch.nn.Linear(2, 2)
    encoder.register_parameter("scale", torch.nn.Parameter(torch.tensor(1.0)))
    before = module_fingerprint(encoder)
    with torch.no_grad():
        encoder.scale.fill_(2.0)
    assert module_fingerprint(encoder) != before
