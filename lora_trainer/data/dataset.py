"""Training batches: bucketed, repeated, shuffled per epoch, with optional latent caching."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from lora_trainer.config import DatasetConfig, SubsetConfig, TrainConfig
from lora_trainer.data.buckets import make_buckets, nearest_bucket, square_bucket
from lora_trainer.data.disk_cache import DiskCache
from lora_trainer.data.images import load_rgb_image
from lora_trainer.data.masks import load_mask, mask_file_for, mask_tensor
from lora_trainer.data.scan import DatasetScan, ImageRecord
from lora_trainer.data.transforms import crop_like, crop_position, crop_to_bucket, process_caption, to_tensor
from lora_trainer.errors import UserError

VAE_CALL_PIXELS = 1024 * 1024
"""Pixels per VAE call while caching latents, unless `vae_batch_size` says: the encoder's activations grow with
them (about 2.5 GB per megapixel in fp32), its speed hardly does past this."""
MAX_VAE_CALL_IMAGES = 8


def vae_images_per_call(dataset: DatasetConfig, bucket: tuple[int, int]) -> int:
    """How many images of size `bucket` (mirror images included) one VAE call encodes while caching latents."""
    if dataset.vae_batch_size:
        return dataset.vae_batch_size
    return max(1, min(MAX_VAE_CALL_IMAGES, VAE_CALL_PIXELS // (bucket[0] * bucket[1])))


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
    masks: torch.Tensor | None = None
    """[B, 1, H, W] uint8 loss masks (255: counts fully), with `masked_loss`."""
    sample_weights: torch.Tensor | None = None
    """[B] loss weight of each example (the prior loss weight for regularisation images), when the run has any."""


@dataclass
class _Example:
    record: ImageRecord
    bucket: tuple[int, int]


class TrainingData:
    """The dataset as the loop sees it: a fixed number of batches per epoch, each from one bucket.

    Regularisation images (`reg_records`) fill each epoch up to as many examples as the training images give
    (repeats counted), cycling through them from where the last epoch stopped, as kohya mixes them in.

    With several `processes` training together, a batch is the global batch of all of them (`batch_size` rows
    of each): every process plans the same epoch and trains its own rows of each batch."""

    def __init__(self, scan: DatasetScan, config: TrainConfig, latent_scale: int,
                 reg_records: list[ImageRecord] | None = None, processes: int = 1):
        self.config = config
        self.global_batch_size = config.training.batch_size * processes
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
                         for record in [*scan.records, *(reg_records or [])]]
        self.latent_cache: dict[tuple[int, bool], torch.Tensor] | None = None
        self.mask_cache: dict[tuple[int, bool], torch.Tensor] = {}
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
        """Images seen per epoch, repeats included (regularisation images as many again, when there are any)."""
        training = sum(example.record.repeats for example in self.examples if not example.record.is_reg)
        return training * 2 if self.has_reg_images else training

    @property
    def has_reg_images(self) -> bool:
        """Whether regularisation images are mixed in."""
        return any(example.record.is_reg for example in self.examples)

    def batches_per_epoch(self) -> int:
        """Forward passes per epoch (the last batch of a bucket may be smaller)."""
        return len(self.epoch_plan(0))

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """Example indices of each batch of `epoch`, in the order they are trained (deterministic per seed)."""
        rng = random.Random(f"{self.config.training.seed}-epoch-{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index in self._epoch_indices(epoch):
            by_bucket.setdefault(self.examples[index].bucket, []).append(index)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            size = self.global_batch_size
            batches += [indices[start:start + size] for start in range(0, len(indices), size)]
        rng.shuffle(batches)
        return batches

    def _epoch_indices(self, epoch: int) -> list[int]:
        """Every example index seen in `epoch`, repeats included: all training images, then as many
        regularisation images, taken in turn from where the previous epoch's ended."""
        training, regularisation = [], []
        for index, example in enumerate(self.examples):
            (regularisation if example.record.is_reg else training).extend([index] * example.record.repeats)
        if not regularisation:
            return training
        start = epoch * len(training)
        return training + [regularisation[(start + offset) % len(regularisation)] for offset in range(len(training))]

    def cache_latents(self, encode_images: Callable[[torch.Tensor], torch.Tensor],
                      progress: Callable[[int, int], None] | None = None,
                      disk: DiskCache | None = None, share: tuple[int, int] = (0, 1),
                      should_stop: Callable[[], bool] | None = None) -> int:
        """Encode every image, and its mirror image with flip_aug, once and keep the latents; `progress(done,
        total)` is called after each chunk of images, and the caching ends there, incomplete, once `should_stop()`
        says so. With `disk`, latents kept there by an earlier run are read instead of encoded, and new ones are
        kept there. Returns how many images were encoded.

        Images of one bucket are encoded several at a time (`vae_images_per_call`): one VAE call per small image
        is several times slower. With `share` (this process's index, the process count), only every count-th
        chunk from the index-th is cached here (`cached_share` hands them to the other processes).
        """
        self.latent_cache = {}
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, example in enumerate(self.examples):
            by_bucket.setdefault(example.bucket, []).append(index)
        chunks: list[list[int]] = []
        for bucket, indices in by_bucket.items():
            flips = 2 if any(self._options(self.examples[index]).flip_aug for index in indices) else 1
            chunk_size = max(1, vae_images_per_call(self.config.dataset, bucket) // flips)
            chunks += [indices[start:start + chunk_size] for start in range(0, len(indices), chunk_size)]
        own_chunks = chunks[share[0]::share[1]]
        total = sum(len(chunk) for chunk in own_chunks)
        done = encoded = 0
        for chunk in own_chunks:
            pixels, sizes, keys, new_entries = [], [], [], []
            for index in chunk:
                example = self.examples[index]
                crop = crop_position((example.record.width, example.record.height), example.bucket, False,
                                     random.Random(0))
                flips = (False, True) if self._options(example).flip_aug else (False,)
                entry = disk.latents_path(example.record.path, example.bucket, flips) if disk else None
                kept = disk.load_latents(entry) if disk else None
                if kept is not None:  # no need to decode the image at all
                    self.latent_cache.update(((index, flip), latents) for flip, latents in zip(flips, kept))
                else:
                    image, _ = crop_to_bucket(load_rgb_image(example.record.path), example.bucket, False,
                                              random.Random(0))
                    pixels += [to_tensor(image, flip) for flip in flips]
                    keys += [(index, flip) for flip in flips]
                    new_entries.append((entry, len(flips)))
                sizes.append(_size_conditioning(example, crop))
                if self.config.dataset.masked_loss:
                    self.mask_cache.update(((index, flip), self._mask(example, crop, flip)) for flip in flips)
            device = None
            if pixels:
                latents = encode_images(torch.stack(pixels))
                self.latent_cache.update(zip(keys, latents))
                device, position = latents.device, 0
                for entry, flip_count in new_entries:
                    if disk is not None:
                        disk.store_latents(entry, latents[position:position + flip_count])
                    position += flip_count
                encoded += len(new_entries)
            device = device or self.latent_cache[(chunk[0], False)].device
            self._cached_sizes.update(zip(chunk, torch.tensor(sizes, device=device).unbind()))
            done += len(chunk)
            if progress is not None:
                progress(done, total)
            if should_stop is not None and should_stop():
                break
        return encoded

    def cached_share(self) -> list[dict]:
        """What `cache_latents` kept here (latents, size conditionings, masks), in CPU memory, for the other
        processes' `add_cached_share`."""
        return [{key: tensor.cpu() for key, tensor in cache.items()} for cache in self._caches()]

    def add_cached_share(self, share: list[dict], device: torch.device) -> None:
        """Keep another process's `cached_share` too, on `device`."""
        for cache, shared in zip(self._caches(), share):
            cache.update((key, tensor.to(device)) for key, tensor in shared.items())

    def _caches(self) -> tuple[dict, dict, dict]:
        return self.latent_cache, self._cached_sizes, self.mask_cache

    def load_batch(self, indices: list[int], rng: random.Random, rows: range | None = None) -> Batch:
        """Load the examples `indices` (augmented with `rng`) as one batch, or only its `rows`: the augmentation
        of every example is drawn all the same, so that `rng` moves on as for the whole batch."""
        dataset = self.config.dataset
        captions, sizes, pixels, latents, masks = [], [], [], [], []
        kept = range(len(indices)) if rows is None else rows
        for position, index in enumerate(indices):
            example = self.examples[index]
            options = self._options(example)
            flip = options.flip_aug and rng.random() < 0.5
            caption = process_caption(example.record.caption, options.shuffle_caption, options.keep_tokens,
                                      options.caption_dropout_rate, rng)
            if self.latent_cache is None:
                crop = crop_position((example.record.width, example.record.height), example.bucket,
                                     dataset.random_crop, rng)
            if position not in kept:
                continue
            captions.append(caption)
            if self.latent_cache is not None:
                latents.append(self.latent_cache[(index, flip)])
                sizes.append(self._cached_sizes[index])
                if dataset.masked_loss:
                    masks.append(self.mask_cache[(index, flip)])
            else:
                image = crop_like(load_rgb_image(example.record.path), example.bucket, crop)
                pixels.append(to_tensor(image, flip))
                sizes.append(torch.tensor(_size_conditioning(example, crop)))
                if dataset.masked_loss:
                    masks.append(self._mask(example, crop, flip))
        weights = [self.config.loss.prior_loss_weight if self.examples[indices[position]].record.is_reg else 1.0
                   for position in kept]
        return Batch(captions=captions, size_conditioning=torch.stack(sizes),
                     pixels=torch.stack(pixels) if pixels else None,
                     latents=torch.stack(latents) if latents else None,
                     masks=torch.stack(masks) if masks else None,
                     sample_weights=torch.tensor(weights) if self.has_reg_images else None)

    def _options(self, example: _Example) -> SubsetConfig | DatasetConfig:
        """The caption and flip options of `example`: its subset's, else the dataset's."""
        return example.record.subset_options or self.config.dataset

    def _mask(self, example: _Example, crop: tuple[int, int], flip: bool) -> torch.Tensor:
        """The example's loss mask fitted to its bucket (all 255 when it has none)."""
        mask = load_mask(example.record.path, mask_file_for(example.record.path, self.config.dataset.mask_dir))
        width, height = example.bucket
        if mask is None:
            return torch.full((1, height, width), 255, dtype=torch.uint8)
        return mask_tensor(crop_like(mask, example.bucket, crop, Image.BILINEAR), flip)

    def summary(self) -> str:
        """Buckets and per-epoch counts, for the start-of-run report."""
        buckets = ", ".join(f"{w}x{h}: {count}" for (w, h), count in self.bucket_counts.items())
        cache = "cached once" if self.uses_latent_cache else "encoded every step"
        return (f"{len(self.bucket_counts)} bucket(s) ({buckets}); {self.examples_per_epoch} examples and "
                f"{self.batches_per_epoch()} batches of up to {self.global_batch_size} per epoch; "
                f"latents {cache}")


def _size_conditioning(example: _Example, crop: tuple[int, int]) -> list[float]:
    """SDXL's size conditioning: original height/width, crop top/left, target height/width."""
    bucket_width, bucket_height = example.bucket
    return [float(example.record.height), float(example.record.width), float(crop[0]), float(crop[1]),
            float(bucket_height), float(bucket_width)]
