"""Training-noise options kohya users reach for: multires (pyramid) noise, input perturbation (ip_noise_gamma),
zero-terminal-SNR rescaling of the schedule and debiased-estimation loss weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_trainer.models.base import PredictionType

SMALLEST_ALPHA_CUMPROD = 4.8973451890853435e-08
"""The last step's alpha-bar after zero-terminal-SNR rescaling: kohya's value, small enough to be pure noise,
not zero, so that SNR-based weights stay finite."""


def add_multires_noise(noise: torch.Tensor, iterations: int, discount: float,
                       generator: torch.Generator | None) -> torch.Tensor:
    """`noise` plus `iterations` levels of lower-resolution noise, each upsampled and weighted by `discount` to the
    power of its level, rescaled to unit variance (pyramid noise, Whitaker 2023)."""
    batch, channels, height, width = noise.shape
    noise = noise.float()
    for level in range(1, iterations + 1):
        size = (max(1, height // 2**level), max(1, width // 2**level))
        coarse = torch.randn((batch, channels, *size), generator=generator, device=noise.device)
        noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if min(size) == 1:
            break
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


def perturbed_input_noise(noise: torch.Tensor, gamma: float, generator: torch.Generator | None) -> torch.Tensor:
    """The noise the latents are noised with under input perturbation: `noise + gamma * fresh noise`; the loss's
    target keeps the unperturbed `noise` (Ning et al. 2023)."""
    fresh = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + gamma * fresh


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The schedule rescaled so that its last step is pure noise (Lin et al. 2023): sqrt(alpha-bar) is shifted
    and scaled to end at 0 while its first value stays; the last value is then `SMALLEST_ALPHA_CUMPROD`."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    rescaled = root**2
    rescaled[-1] = SMALLEST_ALPHA_CUMPROD
    return rescaled.to(alphas_cumprod.dtype)


def debiased_estimation_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                                prediction_type: PredictionType) -> torch.Tensor:
    """Per-sample loss weights 1/sqrt(SNR) (v-prediction: 1/sqrt(SNR + 1)), at most 1000, that undo the noise
    schedule's bias towards the low-noise steps (Yu et al. 2023)."""
    alpha = alphas_cumprod[timesteps].float()
    snr = alpha / (1 - alpha)
    if prediction_type == "v_prediction":
        snr = snr + 1
    return torch.clamp(1 / snr.sqrt(), max=1000.0)
