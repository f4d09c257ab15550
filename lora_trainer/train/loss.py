"""The diffusion training objective: forward noising, eps/v/flow targets, squared or pseudo-Huber error, min-SNR
weighting, loss masks, per-sample weights, offset noise."""

from __future__ import annotations

import math

import torch

from lora_trainer.config import HuberSchedule, LossConfig, LossType
from lora_trainer.data.masks import mask_on_grid
from lora_trainer.errors import UserError
from lora_trainer.models.base import PredictionType


def sample_noise(latents: torch.Tensor, noise_offset: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise like `latents`, plus a per-channel constant offset when `noise_offset` > 0."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator,
                             device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    return noise


FLOW_UNSUPPORTED = ("min_snr_gamma", "debiased_estimation_loss", "zero_terminal_snr")
"""Loss settings defined on an eps/v noise schedule's SNR, which a flow-matching model does not have."""


def draw_timesteps(count: int, alphas_cumprod: torch.Tensor | None, flow_shift: float | None,
                   generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Each sample's noise level: a uniform step of the schedule `alphas_cumprod`, or for a flow model (`flow_shift`
    set) a sigma in (0, 1), the sigmoid of a standard normal time-shifted by mu = `flow_shift` as Flux samples
    (kohya's `flux_shift` sampling at the shift Forge's sampler uses)."""
    if flow_shift is None:
        return torch.randint(0, len(alphas_cumprod), (count,), generator=generator, device=device)
    uniform = torch.sigmoid(torch.randn((count,), generator=generator, device=device))
    return math.exp(flow_shift) / (math.exp(flow_shift) + 1 / uniform - 1)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor | None, prediction_type: PredictionType) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps; for a flow model, whose timesteps are sigmas, (1 - s) x_0 + s eps."""
    if prediction_type == "flow":
        sigma = _per_sample(timesteps, latents)
        return ((1 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)
    alpha = _per_sample(alphas_cumprod[timesteps], latents)
    return (alpha.sqrt() * latents.float() + (1 - alpha).sqrt() * noise.float()).to(latents.dtype)


def diffusion_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     alphas_cumprod: torch.Tensor | None, prediction_type: PredictionType) -> torch.Tensor:
    """What the model should predict: the noise (eps), v = sqrt(a_t) eps - sqrt(1 - a_t) x_0, or the flow's
    velocity eps - x_0."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "flow":
        return noise.float() - latents.float()
    alpha = _per_sample(alphas_cumprod[timesteps], latents)
    return alpha.sqrt() * noise.float() - (1 - alpha).sqrt() * latents.float()


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                   alphas_cumprod: torch.Tensor, prediction_type: PredictionType,
                   min_snr_gamma: float | None, masks: torch.Tensor | None = None,
                   sample_weights: torch.Tensor | None = None, loss_type: LossType = "l2",
                   huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample, min-SNR-gamma weighted when asked, averaged over the batch.

    `masks` (uint8 [B, 1, H, W] at pixel resolution, 255: counts fully) make each sample's error a mean weighted
    by its mask on the latent grid, so that only the masked region is learned; `sample_weights` ([B]) scale
    whole samples (regularisation images' prior loss weight). `loss_type` huber or smooth_l1 replaces the squared
    error by kohya's pseudo-Huber error with each sample's threshold `huber_c` ([B]: `huber_thresholds`)."""
    squared_error = elementwise_error(prediction, target, loss_type, huber_c)
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


def elementwise_error(prediction: torch.Tensor, target: torch.Tensor, loss_type: LossType,
                      huber_c: torch.Tensor | None) -> torch.Tensor:
    """The error at each element: squared (l2), or pseudo-Huber, 2c(sqrt(d^2 + c^2) - c) (huber) or
    2(sqrt(d^2 + c^2) - c) (smooth_l1), which grow like |d| past the threshold c."""
    difference = prediction.float() - target.float()
    if loss_type == "l2":
        return difference**2
    threshold = _per_sample(huber_c, difference)
    pseudo = (difference**2 + threshold**2).sqrt() - threshold
    return 2 * threshold * pseudo if loss_type == "huber" else 2 * pseudo


def huber_thresholds(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, schedule: HuberSchedule,
                     huber_c: float) -> torch.Tensor:
    """Each sample's Huber threshold as kohya schedules it: `huber_c` (constant), decaying exponentially from 1
    at t=0 to `huber_c` at the last step (exponential), or from 1 towards `huber_c` as the noise level grows
    (snr: (1 - c) / (1 + sigma_t)^2 + c)."""
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c, device=timesteps.device)
    if schedule == "exponential":
        rate = -math.log(huber_c) / len(alphas_cumprod)
        return torch.exp(-rate * timesteps.float())
    alpha = alphas_cumprod[timesteps].float()
    sigma = ((1 - alpha) / alpha).sqrt()
    return (1 - huber_c) / (1 + sigma) ** 2 + huber_c


def refuse_for_flow(loss: LossConfig) -> None:
    """Raise a `UserError` naming the loss settings a flow-matching model (Flux) cannot use."""
    asked = [name for name in FLOW_UNSUPPORTED if getattr(loss, name)]
    if loss.loss_type != "l2" and loss.huber_schedule != "constant":
        asked.append(f"huber_schedule {loss.huber_schedule}")
    if asked:
        raise UserError(f"{', '.join(asked)} rest on an eps/v model's noise schedule, which Flux (a flow-matching "
                        "model) does not have: turn them off (a Huber loss needs huber_schedule constant)")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.float().reshape(-1, *([1] * (like.dim() - 1)))
