"""Training-noise and loss options: pyramid noise, input perturbation, zero-terminal SNR, debiased estimation,
the pseudo-Huber loss and its thresholds."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.config import config_from_dict
from lora_trainer.train.loss import elementwise_error, huber_thresholds
from lora_trainer.train.noise import (
    SMALLEST_ALPHA_CUMPROD,
    add_multires_noise,
    debiased_estimation_weights,
    perturbed_input_noise,
    zero_terminal_snr,
)

ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, dim=0)


def test_zero_terminal_snr_ends_in_pure_noise_and_keeps_the_first_step():
    rescaled = zero_terminal_snr(ALPHAS_CUMPROD)
    assert rescaled[0] == pytest.approx(float(ALPHAS_CUMPROD[0]))
    assert float(rescaled[-1]) == pytest.approx(SMALLEST_ALPHA_CUMPROD)
    assert bool((rescaled[1:] < rescaled[:-1]).all())


def test_multires_noise_has_unit_variance_and_coarse_structure():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 32, 32, generator=generator)
    pyramid = add_multires_noise(noise, iterations=6, discount=0.8, generator=generator)
    assert pyramid.shape == noise.shape
    assert pyramid.std(dim=(1, 2, 3)).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    # Neighbouring pixels share the coarse levels: far more correlated than in white noise.
    neighbours = torch.corrcoef(torch.stack([pyramid[..., :-1].flatten(), pyramid[..., 1:].flatten()]))[0, 1]
    assert neighbours > 0.3


def test_input_perturbation_adds_gamma_times_fresh_noise():
    noise = torch.zeros(1, 4, 8, 8)
    perturbed = perturbed_input_noise(noise, 0.1, torch.Generator().manual_seed(3))
    assert torch.allclose(perturbed, 0.1 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)))


def test_debiased_estimation_weights_are_one_over_root_snr_capped_at_1000():
    timesteps = torch.tensor([0, 500, 999])
    alpha = ALPHAS_CUMPROD[timesteps]
    expected = torch.clamp((alpha / (1 - alpha)).rsqrt(), max=1000)
    assert torch.allclose(debiased_estimation_weights(timesteps, ALPHAS_CUMPROD, "epsilon"), expected)
    assert debiased_estimation_weights(torch.tensor([999]), zero_terminal_snr(ALPHAS_CUMPROD), "epsilon") == 1000


def test_pseudo_huber_is_squared_error_near_zero_and_linear_far_out():
    prediction, target, threshold = torch.tensor([[1e-3, 10.0]]), torch.zeros(1, 2), torch.tensor([0.1])
    huber = elementwise_error(prediction, target, "huber", threshold)
    assert huber[0, 0] == pytest.approx(1e-6, rel=1e-2) and huber[0, 1] == pytest.approx(2 * 0.1 * (10 - 0.1), rel=1e-3)
    smooth = elementwise_error(prediction, target, "smooth_l1", threshold)
    assert smooth[0, 0] == pytest.approx(1e-6 / 0.1, rel=1e-2)
    assert torch.equal(elementwise_error(prediction, target, "l2", None), prediction**2)


@pytest.mark.parametrize("schedule", ["exponential", "snr"])
def test_huber_thresholds_fall_from_about_1_towards_huber_c_as_noise_grows(schedule):
    thresholds = huber_thresholds(torch.tensor([0, 999]), ALPHAS_CUMPROD, schedule, 0.1)
    assert thresholds[0] == pytest.approx(1.0, abs=0.06) and thresholds[1] == pytest.approx(0.1, abs=0.03)
    constant = huber_thresholds(torch.tensor([0, 999]), ALPHAS_CUMPROD, "constant", 0.1)
    assert constant.tolist() == pytest.approx([0.1, 0.1])


def test_a_run_with_every_noise_and_loss_option_trains_and_records_them(shapes_dataset, tmp_path):
    pytest.importorskip("diffusers")
    from safetensors import safe_open

    from lora_trainer.models.diffusers_backend import DiffusersBackend
    from lora_trainer.tiny import tiny_sd_pipeline
    from lora_trainer.train.loop import train

    backend = DiffusersBackend(tiny_sd_pipeline("sd2", seed=0, tokenizer_folder=tmp_path / "tok"), "cpu")
    config = config_from_dict(dict(
        train_data_dir=shapes_dataset, resolution=32, bucket_step=8, lora_rank=4, max_train_steps=3,
        log_every_n_steps=1, output_dir=tmp_path / "out", logging_dir=None, multires_noise_iterations=6,
        multires_noise_discount=0.3, ip_noise_gamma=0.1, zero_terminal_snr=True, debiased_estimation_loss=True,
        min_snr_gamma=5, loss_type="huber", huber_schedule="exponential"))
    result = train(config, backend)
    assert result.last_loss is not None
    with safe_open(str(result.saved[-1]), "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_multires_noise_iterations"], metadata["ss_multires_noise_discount"]) == ("6", "0.3")
    assert (metadata["ss_ip_noise_gamma"], metadata["ss_zero_terminal_snr"]) == ("0.1", "True")
    assert metadata["ss_debiased_estimation"] == "True"
    assert (metadata["ss_loss_type"], metadata["ss_huber_schedule"], metadata["ss_huber_c"]) == (
        "huber", "exponential", "0.1")
