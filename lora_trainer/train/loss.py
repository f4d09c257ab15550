"""The diffusion training objective: forward noising, eps/v targets, min-SNR weighting, loss masks, per-sample
weights, offset noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_trainer.data.masks import mask_on_grid
from lora_trainer.models.base import PredictionType


def sample_noise(latents: torch.Tensor, noise_offset: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise like `latents`, plus a per-channel constant offset when `noise_offset` > 0."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator,
                             device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    return noise


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
    alpha = _per_sample(alphas_cumprod[timesteps], latents)
    return (alpha.sqrt() * latents.float() + (1 - alpha).sqrt() * noise.float()).to(latents.dtype)


def diffusion_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     alphas_cumprod: torch.Tensor, prediction_type: PredictionType) -> torch.Tensor:
    """What the UNet should predict: the noise (eps) or v = sqrt(a_t) eps - sqrt(1 - a_t) x_0."""
    if prediction_type == "epsilon":
        return noise.float()
    alpha = _per_sample(alphas_cumprod[timesteps], latents)
    return alpha.sqrt() * noise.float() - (1 - alpha).sqrt() * latents.float()


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                   alphas_cumprod: torch.Tensor, prediction_type: PredictionType,
                   min_snr_gamma: float | None, masks: torch.Tensor | None = None,
                   sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample, min-SNR-gamma weighted when asked, averaged over the batch.

    `masks` (uint8 [B, 1, H, W] at pixel resolution, 255: counts fully) make each sample's error a mean weighted
    by its mask on the latent grid, so that only the masked region is learned; `sample_weights` ([B]) scale
    whole samples (regularisation images' prior loss weight)."""
    squared_error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if masks is None:
        per_sample = squared_error.mean(dim=(1, 2, 3))
    else:
        weights = mask_on_grid(masks, squared_error.shape[-2:]).to(squared_error).expand_as(squared_error)
        per_sample = (squared_error * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp(min=1e-6)
    if min_snr_gamma is not None:
        alpha = alphas_cumprod[timesteps]
        snr = alpha / (1 - alpha)
        clipped = torch.clamp(snr, max=min_snr_gamma)
        weight = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
        per_sample = per_sample * weight
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample)
    return per_sample.mean()


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.float().reshape(-1, *([1] * (like.dim() - 1)))
