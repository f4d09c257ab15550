"""Measurements the training tests share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from lora_trainer.config import TrainConfig, config_from_dict
from lora_trainer.data.dataset import TrainingData
from lora_trainer.data.scan import scan_dataset
from lora_trainer.models.base import DiffusionBackend
from lora_trainer.train.loss import add_noise, diffusion_loss, diffusion_target
from lora_trainer.world import COLOURS, colour_rate

TINY_SIZES = torch.tensor([[32, 32, 0, 0, 32, 32]], dtype=torch.float32)


def fixed_noise_loss(backend: DiffusionBackend, config: TrainConfig) -> float:
    """Denoising loss on the training images of `config` with fixed noise and timesteps (a flow model's sigmas:
    the timesteps over 1000)."""
    flow = backend.prediction_type == "flow"
    alphas_cumprod = None if flow else backend.alphas_cumprod
    data = TrainingData(scan_dataset(config.dataset.train_data_dir), config, backend.latent_scale)
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
                timesteps = torch.tensor([timestep / 1000 if flow else timestep])
                noisy = add_noise(latents, noise, timesteps, alphas_cumprod, backend.prediction_type)
                prediction = backend.predict(noisy, timesteps, text, TINY_SIZES)
                target = diffusion_target(latents, noise, timesteps, alphas_cumprod, backend.prediction_type)
                losses.append(float(diffusion_loss(prediction, target, timesteps, alphas_cumprod,
                                                   backend.prediction_type, None)))
    return sum(losses) / len(losses)


CONCEPT = ("magenta", "sks")
"""The colour a LoRA teaches in the learning tests, and the trigger word that names it."""
SECOND_CONCEPT = ("yellow", "zwx")
"""A second word a LoRA teaches (a colour the base knows, under a word it does not)."""
RATE_SEEDS = range(8)


def concept_config(dataset: Path, output_dir: Path, **overrides) -> TrainConfig:
    """A short LoRA run on a concept dataset of the learned tiny bases."""
    settings = dict(train_data_dir=dataset, resolution=32, bucket_step=8, lora_rank=8, learning_rate=1e-2,
                    batch_size=4, max_train_steps=200, scheduler="cosine", warmup_steps=10, output_dir=output_dir,
                    output_name="concept", logging_dir=None, log_every_n_steps=10)
    settings.update(overrides)
    return config_from_dict(settings)


def drawn_colour_rate(generate: Callable[[str, int], Image.Image], prompt: str, colour: str,
                      seeds: range = RATE_SEEDS, colours: tuple[str, ...] = tuple(COLOURS)) -> float:
    """The share of `seeds` for which `generate(prompt, seed)` draws `colour` (the nearest of `colours`)."""
    return colour_rate([generate(prompt, seed) for seed in seeds], colour, colours)
