"""Measurements the training tests share."""

from __future__ import annotations

import torch

from lora_trainer.config import TrainConfig
from lora_trainer.data.dataset import TrainingData
from lora_trainer.data.scan import scan_dataset
from lora_trainer.models.base import DiffusionBackend
from lora_trainer.train.loss import add_noise, diffusion_loss, diffusion_target

TINY_SIZES = torch.tensor([[32, 32, 0, 0, 32, 32]], dtype=torch.float32)


def fixed_noise_loss(backend: DiffusionBackend, config: TrainConfig) -> float:
    """Denoising loss on the training images of `config` with fixed noise and timesteps."""
    data = TrainingData(scan_dataset(config.train_data_dir), config, backend.latent_scale)
    generator = torch.Generator().manual_seed(1234)
    losses = []
    with torch.no_grad():
        torch.manual_seed(1234)  # the VAE samples its latents
        data.cache_latents(backend.encode_images)
        for index, example in enumerate(data.examples):
            latents = data.latent_cache[(index, False)].unsqueeze(0)
            text = backend.encode_text([example.record.caption])
            for timestep in (100, 300, 500, 700, 900):
                noise = torch.randn(latents.shape, generator=generator)
                timesteps = torch.tensor([timestep])
                noisy = add_noise(latents, noise, timesteps, backend.alphas_cumprod)
                prediction = backend.predict(noisy, timesteps, text, TINY_SIZES)
                target = diffusion_target(latents, noise, timesteps, backend.alphas_cumprod, backend.prediction_type)
                losses.append(float(diffusion_loss(prediction, target, timesteps, backend.alphas_cumprod,
                                                   backend.prediction_type, None)))
    return sum(losses) / len(losses)
