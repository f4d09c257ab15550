"""The validation loss: the diffusion loss on held-out images at fixed timesteps and fixed noise, so that its
values compare from step to step and from run to run."""

from __future__ import annotations

import random
from contextlib import nullcontext

import torch

from lora_trainer.config import TrainConfig
from lora_trainer.data.dataset import TrainingData
from lora_trainer.data.scan import DatasetScan, ImageRecord
from lora_trainer.models.base import DiffusionBackend
from lora_trainer.train.loss import add_noise, diffusion_loss, diffusion_target

TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
"""Where in the noise schedule each held-out image is measured."""
DEFAULT_MEASUREMENTS = 20
"""How many times a run measures the validation loss when `validate_every_n_steps` is not set."""


class ValidationSet:
    """Held-out images, encoded once, and the loss of the model as it is now on them."""

    def __init__(self, records: list[ImageRecord], config: TrainConfig, latent_scale: int):
        plain = config.updated(flip_aug=False, shuffle_caption=False, caption_dropout_rate=0.0, random_crop=False,
                               cache_latents=True)
        self.data = TrainingData(DatasetScan(records), plain, latent_scale)
        self.seed = config.training.seed
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, example in enumerate(self.data.examples):
            by_bucket.setdefault(example.bucket, []).append(index)
        size = config.training.batch_size
        self.batches = [indices[start:start + size] for indices in by_bucket.values()
                        for start in range(0, len(indices), size)]

    def __len__(self) -> int:
        return len(self.data.examples)

    def encode(self, backend: DiffusionBackend) -> None:
        """Encode the held-out images with the VAE, once."""
        self.data.cache_latents(backend.encode_images)

    @torch.no_grad()
    def loss(self, backend: DiffusionBackend, autocast=nullcontext) -> float:
        """The mean loss over every held-out image and every timestep of `TIMESTEP_FRACTIONS`, with the noise
        drawn from a generator seeded the same way every time (plain MSE, masked with `masked_loss`)."""
        flow = backend.prediction_type == "flow"
        alphas_cumprod = None if flow else backend.alphas_cumprod
        total, count = 0.0, 0
        for batch_index, indices in enumerate(self.batches):
            batch = self.data.load_batch(indices, random.Random(0))
            latents = batch.latents.to(backend.device)
            text = backend.encode_text(batch.captions)
            for fraction_index, fraction in enumerate(TIMESTEP_FRACTIONS):
                generator = torch.Generator(backend.device).manual_seed(
                    self.seed * 1_000_003 + batch_index * len(TIMESTEP_FRACTIONS) + fraction_index)
                noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
                # A flow model's noise level is the fraction itself (sigma), an eps/v model's the step at it.
                level = fraction if flow else int(fraction * len(alphas_cumprod))
                timesteps = torch.full((latents.shape[0],), level, device=backend.device)
                noisy_latents = add_noise(latents, noise, timesteps, alphas_cumprod, backend.prediction_type)
                with autocast():
                    prediction = backend.predict(noisy_latents, timesteps, text, batch.size_conditioning)
                target = diffusion_target(latents, noise, timesteps, alphas_cumprod, backend.prediction_type)
                loss = diffusion_loss(prediction, target, timesteps, alphas_cumprod, backend.prediction_type,
                                      None, batch.masks)
                total += loss.item() * len(indices)
                count += len(indices)
        return total / count
