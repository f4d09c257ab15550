"""TrainingData: the batches the loop sees, with and without the latent cache."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_trainer.config import config_from_dict
from lora_trainer.data.dataset import TrainingData, vae_images_per_call
from lora_trainer.data.scan import scan_dataset


def _data(folder: Path, **overrides) -> TrainingData:
    config = config_from_dict(dict(train_data_dir=folder, resolution=32, bucket_step=8, min_bucket_side=16,
                         max_bucket_side=64, **overrides))
    return TrainingData(scan_dataset(folder), config, latent_scale=8)


def _fake_encoder(device: str):
    """A stand-in VAE: 8x average pooling, so every latent is traceable to its pixels."""
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled[:, :1]], dim=1).to(device)
    return encode


def _write_mixed_shapes(folder: Path) -> Path:
    folder.mkdir()
    for name, size in {"wide": (48, 24), "tall": (24, 48), "square": (40, 40)}.items():
        Image.new("RGB", size, "red").save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} image")
    return folder


def test_cached_and_uncached_batches_carry_the_same_size_conditioning(tmp_path):
    folder = _write_mixed_shapes(tmp_path / "data")
    cached, uncached = _data(folder), _data(folder, cache_latents=False)
    cached.cache_latents(_fake_encoder("cpu"))
    for indices in cached.epoch_plan(0):
        from_cache = cached.load_batch(indices, random.Random(0))
        from_pixels = uncached.load_batch(indices, random.Random(0))
        assert from_cache.pixels is None and from_pixels.latents is None
        assert torch.equal(from_cache.size_conditioning, from_pixels.size_conditioning)
        assert torch.equal(from_cache.latents, _fake_encoder("cpu")(from_pixels.pixels))


def test_size_conditioning_is_original_size_crop_and_bucket(tmp_path):
    folder = _write_mixed_shapes(tmp_path / "data")
    data = _data(folder)
    index = next(i for i, example in enumerate(data.examples) if example.record.path.stem == "wide")
    batch = data.load_batch([index], random.Random(0))
    width, height = data.examples[index].bucket
    assert width > height
    original_height, original_width, crop_top, crop_left, target_height, target_width = batch.size_conditioning[0]
    assert (original_height, original_width, target_height, target_width) == (24, 48, height, width)
    assert crop_top >= 0 and crop_left >= 0


def test_cached_size_conditioning_lives_on_the_latents_device(tmp_path):
    # The loop must not copy host data to the GPU every step; the meta device stands in for it here.
    data = _data(_write_mixed_shapes(tmp_path / "data"))
    data.cache_latents(_fake_encoder("meta"))
    batch = data.load_batch(data.epoch_plan(0)[0], random.Random(0))
    assert batch.latents.device.type == "meta"
    assert batch.size_conditioning.device.type == "meta"


def test_flip_aug_caches_both_mirror_images(tmp_path):
    data = _data(_write_mixed_shapes(tmp_path / "data"), flip_aug=True)
    data.cache_latents(_fake_encoder("cpu"))
    assert len(data.latent_cache) == 2 * len(data.examples)
    for index in range(len(data.examples)):
        assert torch.equal(data.latent_cache[(index, True)], data.latent_cache[(index, False)].flip(-1))


@pytest.mark.parametrize("settings, bucket_side, images_per_call", [
    ({}, 32, 8), ({}, 512, 4), ({}, 768, 1), ({}, 1024, 1), ({"vae_batch_size": 3}, 1024, 3)])
def test_a_vae_call_encodes_about_a_megapixel_unless_vae_batch_size_says(settings, bucket_side, images_per_call):
    dataset = config_from_dict({"train_data_dir": "data", **settings}).dataset
    assert vae_images_per_call(dataset, (bucket_side, bucket_side)) == images_per_call


@pytest.mark.parametrize("flip_aug, calls", [(False, [2, 2, 1]), (True, [2, 2, 2, 2, 2])])
def test_caching_encodes_vae_batch_size_images_per_call_mirror_images_included(tmp_path, flip_aug, calls):
    folder = tmp_path / "data"
    folder.mkdir()
    for number in range(5):
        Image.new("RGB", (32, 32), (50 * number, 0, 0)).save(folder / f"{number}.png")
    images_seen = []
    encode = _fake_encoder("cpu")

    def counting_encoder(pixels: torch.Tensor) -> torch.Tensor:
        images_seen.append(len(pixels))
        return encode(pixels)

    data = _data(folder, flip_aug=flip_aug, vae_batch_size=2)
    data.cache_latents(counting_encoder)
    assert images_seen == calls
    assert len(data.latent_cache) == sum(calls)


def test_every_repeat_is_trained_once_per_epoch(tmp_path):
    folder = tmp_path / "data"
    (folder / "3_subject").mkdir(parents=True)
    for index in range(5):
        Image.new("RGB", (32, 32), "blue").save(folder / "3_subject" / f"{index}.png")
    data = TrainingData(scan_dataset(folder), config_from_dict(dict(train_data_dir=folder, resolution=32, bucket_step=8,
                                                          batch_size=2)), latent_scale=8)
    plan = data.epoch_plan(0)
    assert sorted(i for batch in plan for i in batch) == sorted(list(range(5)) * 3)
    assert data.examples_per_epoch == 15 and data.batches_per_epoch() == 8
    assert plan != data.epoch_plan(1)


def test_a_process_loads_its_rows_of_a_batch_as_the_whole_batch_has_them_and_the_rng_moves_on_alike(tmp_path):
    # Random crops, flips and caption shuffles: every draw a row makes must be the same whoever loads it.
    folder = tmp_path / "data"
    folder.mkdir()
    for index in range(4):
        Image.new("RGB", (48, 40), (60 * index, 0, 0)).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"red, shape {index}, small, plain")
    data = _data(folder, cache_latents=False, random_crop=True, flip_aug=True, shuffle_caption=True)
    indices = [0, 1, 2, 3]
    whole_rng, part_rng = random.Random(5), random.Random(5)
    whole, part = data.load_batch(indices, whole_rng), data.load_batch(indices, part_rng, range(2, 4))
    assert part.captions == whole.captions[2:]
    assert torch.equal(part.pixels, whole.pixels[2:])
    assert torch.equal(part.size_conditioning, whole.size_conditioning[2:])
    assert part_rng.random() == whole_rng.random()
