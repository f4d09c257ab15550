"""Subsets, regularisation images, loss masks and held-out images: what reaches the batches."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.config import config_from_dict
from lora_trainer.data.class_images import class_image_folder, write_class_images
from lora_trainer.data.dataset import TrainingData
from lora_trainer.data.masks import mask_on_grid, mask_overlay
from lora_trainer.data.scan import scan_dataset
from lora_trainer.data.sources import gather_images
from lora_trainer.errors import UserError
from lora_trainer.train.loss import diffusion_loss


def _images(folder: Path, captions: dict[str, str], colour: str = "red", size: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, caption in captions.items():
        Image.new("RGB", (size, size), colour).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)
    return folder


def _pooling_encoder(pixels: torch.Tensor) -> torch.Tensor:
    pooled = torch.nn.functional.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled[:, :1]], dim=1)


def _data(**settings) -> TrainingData:
    config = config_from_dict(dict(resolution=32, bucket_step=8, batch_size=1, **settings))
    sources = gather_images(config.dataset, config.training.seed)
    return TrainingData(sources.scan, config, latent_scale=8, reg_records=sources.reg_records)


def _seen(data: TrainingData, epoch: int = 0) -> Counter:
    return Counter(data.examples[index].record.path.stem for batch in data.epoch_plan(epoch) for index in batch)


def test_each_subset_repeats_its_images_its_own_number_of_times(tmp_path):
    often = _images(tmp_path / "often", {"a1": "a", "a2": "a"})
    once = _images(tmp_path / "once", {"b1": "b"})
    data = _data(subsets=[{"image_dir": str(often), "repeats": 3}, {"image_dir": str(once)}])
    assert _seen(data) == {"a1": 3, "a2": 3, "b1": 1}


def test_subset_options_reach_the_batches_and_unset_ones_come_from_the_dataset(tmp_path):
    plain = _images(tmp_path / "plain", {"p": "first, second, third"})
    shuffled = _images(tmp_path / "shuffled", {"s": "first, second, third"})
    data = _data(flip_aug=False, keep_tokens=1,
                 subsets=[{"image_dir": str(plain)}, {"image_dir": str(shuffled), "shuffle_caption": True,
                                                      "flip_aug": True}])
    data.cache_latents(_pooling_encoder)
    index = {example.record.path.stem: position for position, example in enumerate(data.examples)}
    assert (index["s"], True) in data.latent_cache and (index["p"], True) not in data.latent_cache
    rng = random.Random(0)
    captions = {stem: {data.load_batch([position], rng).captions[0] for _ in range(40)}
                for stem, position in index.items()}
    assert captions["p"] == {"first, second, third"}
    assert len(captions["s"]) > 1 and all(caption.startswith("first, ") for caption in captions["s"])


def test_a_subset_with_a_wrong_key_is_named_with_the_key(tmp_path):
    with pytest.raises(UserError, match=r"dataset subset 2: unknown key 'repeat' \(did you mean 'repeats'\?\)"):
        config_from_dict({"subsets": [{"image_dir": "a"}, {"image_dir": "b", "repeat": 2}]})
    with pytest.raises(UserError, match=r"dataset subset 1 \(a\): config key 'repeats' must be at least 1"):
        config_from_dict({"subsets": [{"image_dir": "a", "repeats": 0}]})


def test_regularisation_images_fill_each_epoch_as_many_as_the_training_images_in_turn(tmp_path):
    train = _images(tmp_path / "train", {"t1": "sks", "t2": "sks"})
    _images(tmp_path / "reg" / "1_circle", {f"r{n}": "circle" for n in range(5)}, colour="blue")
    data = _data(train_data_dir=str(train), reg_data_dir=str(tmp_path / "reg"), prior_loss_weight=0.5)
    first, second = _seen(data, 0), _seen(data, 1)
    assert first == {"t1": 1, "t2": 1, "r0": 1, "r1": 1} and second == {"t1": 1, "t2": 1, "r2": 1, "r3": 1}
    assert data.examples_per_epoch == 4
    batch = data.load_batch([next(i for i, e in enumerate(data.examples) if e.record.is_reg)], random.Random(0))
    assert batch.sample_weights.tolist() == [0.5]


def test_an_is_reg_subset_gives_regularisation_images(tmp_path):
    train = _images(tmp_path / "train", {"t1": "sks"})
    reg = _images(tmp_path / "class", {"r1": "circle"})
    sources = gather_images(config_from_dict({"subsets": [{"image_dir": str(train)},
                                                          {"image_dir": str(reg), "is_reg": True}]}).dataset, 0)
    assert [r.path.stem for r in sources.scan.records] == ["t1"]
    assert [r.path.stem for r in sources.reg_records] == ["r1"] and sources.reg_records[0].is_reg


def _masked_image(folder: Path, name: str, alpha: bool) -> Path:
    """A 32x32 image whose left half is masked in (white) and right half out."""
    folder.mkdir(parents=True, exist_ok=True)
    values = np.zeros((32, 32), dtype=np.uint8)
    values[:, :16] = 255
    if alpha:
        rgba = np.dstack([np.full((32, 32, 3), 200, dtype=np.uint8), values])
        Image.fromarray(rgba, "RGBA").save(folder / f"{name}.png")
    else:
        Image.new("RGB", (32, 32), "red").save(folder / f"{name}.png")
        Image.fromarray(values, "L").save(folder / f"{name}.mask.png")
    (folder / f"{name}.txt").write_text("a thing")
    return folder


@pytest.mark.parametrize("cache_latents", [True, False])
def test_masks_come_from_a_mask_file_or_the_alpha_channel_on_the_latent_grid(tmp_path, cache_latents):
    folder = _masked_image(tmp_path / "data", "from_file", alpha=False)
    _masked_image(folder, "from_alpha", alpha=True)
    _images(folder, {"unmasked": "a thing"})
    data = _data(train_data_dir=str(folder), masked_loss=True, cache_latents=cache_latents, flip_aug=False)
    assert sorted(example.record.path.stem for example in data.examples) == ["from_alpha", "from_file", "unmasked"]
    if cache_latents:
        data.cache_latents(_pooling_encoder)
    for position, example in enumerate(data.examples):
        masks = data.load_batch([position], random.Random(0)).masks
        assert masks.shape == (1, 1, 32, 32) and masks.dtype == torch.uint8
        expected = torch.ones(1, 1, 4, 4) if example.record.path.stem == "unmasked" else \
            torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(4, 4)[None, None]
        assert torch.equal(mask_on_grid(masks, (4, 4)), expected), example.record.path.stem


def test_a_flipped_image_has_its_mask_flipped(tmp_path):
    folder = _masked_image(tmp_path / "data", "half", alpha=False)
    data = _data(train_data_dir=str(folder), masked_loss=True, flip_aug=True)
    data.cache_latents(_pooling_encoder)
    assert torch.equal(data.mask_cache[(0, True)], data.mask_cache[(0, False)].flip(-1))


def test_a_mask_folder_holds_masks_named_like_their_images(tmp_path):
    folder = _images(tmp_path / "data", {"photo": "a thing"})
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (32, 32), 0).save(masks / "photo.png")
    data = _data(train_data_dir=str(folder), masked_loss=True, mask_dir=str(masks))
    assert data.load_batch([0], random.Random(0)).masks.sum() == 0


def test_the_caption_editors_mask_view_tints_only_what_the_mask_leaves_out(tmp_path):
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:] = (0, 200, 0)
    Image.fromarray(image).save(tmp_path / "photo.png")
    Image.fromarray(image).save(tmp_path / "plain.png")
    mask = np.full((32, 32), 255, dtype=np.uint8)
    mask[:, :16] = 0
    Image.fromarray(mask, "L").save(tmp_path / "photo.mask.png")
    overlay = np.asarray(mask_overlay(tmp_path / "photo.png", None))
    assert overlay[:, 20:].tolist() == image[:, 20:].tolist()
    assert (overlay[:, :12, 0] > 50).all() and (overlay[:, :12, 1] < 100).all()
    assert mask_overlay(tmp_path / "plain.png", None) is None


def test_the_masked_loss_counts_only_the_masked_region():
    prediction, target = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    target[..., 0] = 1.0  # error 1 in the left column, 0 in the right
    masks = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    masks[..., :8] = 255  # the left half of the image: the left latent column
    timesteps, alphas = torch.tensor([10]), torch.linspace(0.99, 0.01, 100)
    assert diffusion_loss(prediction, target, timesteps, alphas, "epsilon", None, masks).item() == 1.0
    assert diffusion_loss(prediction, target, timesteps, alphas, "epsilon", None, 255 - masks).item() == 0.0
    assert diffusion_loss(prediction, target, timesteps, alphas, "epsilon", None).item() == 0.5


def test_validation_split_holds_out_a_share_chosen_by_the_seed(tmp_path):
    folder = _images(tmp_path / "data", {f"i{n}": "x" for n in range(10)})
    config = config_from_dict({"train_data_dir": str(folder), "validation_split": 0.2})
    first, again = gather_images(config.dataset, 1), gather_images(config.dataset, 1)
    assert len(first.held_out) == 2 and len(first.scan.records) == 8
    assert [r.path for r in first.held_out] == [r.path for r in again.held_out]
    assert not {r.path for r in first.held_out} & {r.path for r in first.scan.records}
    with pytest.raises(UserError, match="set one of them"):
        config_from_dict({"validation_split": 0.2, "validation_data_dir": str(folder)})


def test_mask_files_are_never_training_images(tmp_path):
    folder = _masked_image(tmp_path / "data", "x", alpha=False)
    assert [record.path.name for record in scan_dataset(folder).records] == ["x.png"]


def test_a_stop_while_class_images_are_drawn_keeps_the_finished_ones_and_not_the_one_cut_short(tmp_path):
    drawn = []

    def render_then_interrupt_the_second(prompt: str, seed: int) -> Image.Image:
        drawn.append(seed)
        return Image.new("RGB", (32, 32), (seed * 40, 0, 0))

    assert write_class_images(tmp_path / "reg", "a dog", 4, render_then_interrupt_the_second,
                              should_stop=lambda: len(drawn) >= 2) == 1
    folder = class_image_folder(tmp_path / "reg", "a dog")
    assert drawn == [0, 1] and sorted(path.name for path in folder.iterdir()) == ["class-00000.png",
                                                                                 "class-00000.txt"]
    assert write_class_images(tmp_path / "reg", "a dog", 4, render_then_interrupt_the_second) == 3
    assert drawn == [0, 1, 1, 2, 3]


def test_class_images_are_drawn_once_and_reused_by_the_next_run(tmp_path):
    drawn = []

    def render(prompt: str, seed: int) -> Image.Image:
        drawn.append((prompt, seed))
        return Image.new("RGB", (32, 32), (seed * 40, 0, 0))

    assert write_class_images(tmp_path / "reg", "a photo of a person", 3, render) == 3
    folder = class_image_folder(tmp_path / "reg", "a photo of a person")
    assert folder == tmp_path / "reg" / "1_a_photo_of_a_person"
    assert drawn == [("a photo of a person", 0), ("a photo of a person", 1), ("a photo of a person", 2)]
    assert {path.read_text() for path in folder.glob("*.txt")} == {"a photo of a person"}
    assert write_class_images(tmp_path / "reg", "a photo of a person", 3, render) == 0
    (folder / "class-00001.png").unlink()
    assert write_class_images(tmp_path / "reg", "a photo of a person", 3, render) == 1 and drawn[-1][1] == 1
    sources = gather_images(config_from_dict({"train_data_dir": str(_images(tmp_path / "train", {"t": "sks"})),
                                              "reg_data_dir": str(tmp_path / "reg")}).dataset, 0)
    assert len(sources.reg_records) == 3


def test_a_class_prompt_needs_a_folder_and_a_count():
    with pytest.raises(UserError, match="set reg_data_dir"):
        config_from_dict({"class_prompt": "a person", "num_class_images": 10})
