"""Training batches: bucketed, repeated, shuffled per epoch, with optional latent caching."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lora_trainer.config import TrainConfig
from lora_trainer.data.buckets import make_buckets, nearest_bucket, square_bucket
from lora_trainer.data.images import load_rgb_image
from lora_trainer.data.scan import DatasetScan, ImageRecord
from lora_trainer.data.transforms import crop_to_bucket, process_caption, to_tensor
from lora_trainer.errors import UserError


@dataclass
class Batch:
    """One forward pass worth of training examples, all of one bucket size."""

    captions: list[str]
    size_conditioning: torch.Tensor
    """[B, 6]: original height/width, crop top/left, target height/width; on the device when latents are cached."""
    pixels: torch.Tensor | None = None
    """[B, 3, H, W] in [-1, 1], when latents are not cached."""
    latents: torch.Tensor | None = None
    """[B, 4, H/8, W/8] scaled latents, when cached."""


@dataclass
class _Example:
    record: ImageRecord
    bucket: tuple[int, int]


class TrainingData:
    """The dataset as the loop sees it: a fixed number of batches per epoch, each from one bucket."""

    def __init__(self, scan: DatasetScan, config: TrainConfig, latent_scale: int):
        self.config = config
        dataset = config.dataset
        if dataset.enable_bucket:
            step = max(dataset.bucket_step, latent_scale)
            if dataset.resolution % step:
                raise UserError(f"resolution {dataset.resolution} must be a multiple of {step} for this model")
            buckets = make_buckets(dataset.resolution, step, dataset.min_bucket_side, dataset.max_bucket_side)
        else:
            buckets = [square_bucket(dataset.resolution)]
        for width, height in buckets:
            if width % latent_scale or height % latent_scale:
                raise UserError(f"bucket {width}x{height} is not a multiple of {latent_scale} pixels, which this "
                                "model needs: use a bucket_step and resolution that are multiples of it")
        self.examples = [_Example(record, nearest_bucket(record.width, record.height, buckets))
                         for record in scan.records]
        self.latent_cache: dict[tuple[int, bool], torch.Tensor] | None = None
        self._cached_sizes: dict[int, torch.Tensor] = {}
        """Each cached example's size conditioning, on the latents' device: no host-to-device copy per step."""

    @property
    def uses_latent_cache(self) -> bool:
        """Whether latents are encoded once up front (not possible with random crops)."""
        return self.config.dataset.cache_latents and not self.config.dataset.random_crop

    @property
    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Images per bucket (width, height)."""
        return dict(sorted(Counter(example.bucket for example in self.examples).items()))

    @property
    def examples_per_epoch(self) -> int:
        """Images seen per epoch, repeats included."""
        return sum(example.record.repeats for example in self.examples)

    def batches_per_epoch(self) -> int:
        """Forward passes per epoch (the last batch of a bucket may be smaller)."""
        return len(self.epoch_plan(0))

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """Example indices of each batch of `epoch`, in the order they are trained (deterministic per seed)."""
        rng = random.Random(f"{self.config.training.seed}-epoch-{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, example in enumerate(self.examples):
            by_bucket.setdefault(example.bucket, []).extend([index] * example.record.repeats)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            size = self.config.training.batch_size
            batches += [indices[start:start + size] for start in range(0, len(indices), size)]
        rng.shuffle(batches)
        return batches

    def cache_latents(self, encode_images: Callable[[torch.Tensor], torch.Tensor], chunk_size: int = 8,
                      progress: Callable[[int, int], None] | None = None) -> None:
        """Encode every image (and its mirror image with flip_aug) once and keep the latents; `progress(done,
        total)` is called after each chunk of images.

        Images of one bucket are encoded `chunk_size` at a time: one VAE call per image is several times slower.
        """
        flips = (False, True) if self.config.dataset.flip_aug else (False,)
        self.latent_cache = {}
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, example in enumerate(self.examples):
            by_bucket.setdefault(example.bucket, []).append(index)
        encoded = 0
        for indices in by_bucket.values():
            for start in range(0, len(indices), chunk_size):
                chunk = indices[start:start + chunk_size]
                pixels = []
                sizes = []
                for index in chunk:
                    example = self.examples[index]
                    image, crop = crop_to_bucket(load_rgb_image(example.record.path), example.bucket, False,
                                                 random.Random(0))
                    pixels += [to_tensor(image, flip) for flip in flips]
                    sizes.append(_size_conditioning(example, crop))
                latents = encode_images(torch.stack(pixels))
                for position, key in enumerate(itertools.product(chunk, flips)):
                    self.latent_cache[key] = latents[position]
                self._cached_sizes.update(zip(chunk, torch.tensor(sizes, device=latents.device).unbind()))
                encoded += len(chunk)
                if progress is not None:
                    progress(encoded, len(self.examples))

    def load_batch(self, indices: list[int], rng: random.Random) -> Batch:
        """Load the examples `indices` (augmented with `rng`) as one batch."""
        dataset = self.config.dataset
        captions, sizes, pixels, latents = [], [], [], []
        for index in indices:
            example = self.examples[index]
            flip = dataset.flip_aug and rng.random() < 0.5
            captions.append(process_caption(example.record.caption, dataset.shuffle_caption, dataset.keep_tokens,
                                            dataset.caption_dropout_rate, rng))
            if self.latent_cache is not None:
                latents.append(self.latent_cache[(index, flip)])
                sizes.append(self._cached_sizes[index])
            else:
                image, crop = crop_to_bucket(load_rgb_image(example.record.path), example.bucket,
                                             dataset.random_crop, rng)
                pixels.append(to_tensor(image, flip))
                sizes.append(torch.tensor(_size_conditioning(example, crop)))
        return Batch(captions=captions, size_conditioning=torch.stack(sizes),
                     pixels=torch.stack(pixels) if pixels else None,
                     latents=torch.stack(latents) if latents else None)

    def summary(self) -> str:
        """Buckets and per-epoch counts, for the start-of-run report."""
        buckets = ", ".join(f"{w}x{h}: {count}" for (w, h), count in self.bucket_counts.items())
        cache = "cached once" if self.uses_latent_cache else "encoded every step"
        return (f"{len(self.bucket_counts)} bucket(s) ({buckets}); {self.examples_per_epoch} examples and "
                f"{self.batches_per_epoch()} batches of up to {self.config.training.batch_size} per epoch; "
                f"latents {cache}")


def _size_conditioning(example: _Example, crop: tuple[int, int]) -> list[float]:
    """SDXL's size conditioning: original height/width, crop top/left, target height/width."""
    bucket_width, bucket_height = example.bucket
    return [float(example.record.height), float(example.record.width), float(crop[0]), float(crop[1]),
            float(bucket_height), float(bucket_width)]
