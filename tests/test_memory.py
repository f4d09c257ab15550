"""The memory plan: weights counted from the model, activations counted per block and checked against a
meta-device trace of what autograd saves, for the full-size SD1.5, SD2 and SDXL architectures (nothing is
downloaded: the models are built on the meta device from their published configs)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("diffusers")

from full_size import (  # noqa: E402
    PUBLISHED_UNET_PARAMETERS,
    PUBLISHED_VAE_PARAMETERS,
    UNET_CONFIGS,
    fused_attention,
    meta_unet,
    meta_vae,
    saved_bytes,
)

from lora_trainer.config import NetworkConfig, config_from_dict  # noqa: E402
from lora_trainer.lora.network import LoraNetwork  # noqa: E402
from lora_trainer.lora.targets import find_lora_targets  # noqa: E402
from lora_trainer.models.base import LoraRoot  # noqa: E402
from lora_trainer.models.layout import layout_of_diffusers_unet  # noqa: E402
from lora_trainer.train.memory import (  # noqa: E402
    GIB,
    LiveBytes,
    ModelFootprint,
    activation_elements,
    estimate_memory,
    fp8_bytes,
    plan_memory,
    tensor_bytes,
    vae_bytes_per_pixel,
)

LATENT_SIDE = {"sd1": 64, "sd2": 96, "sdxl": 128}
"""Each model's native resolution in latent cells (512, 768 and 1024 px)."""
TRACE_ERROR = 0.08
"""The activation count's stated error against the meta-device trace (measured: -2% to +5%)."""


def _unet_lora(unet, conv_rank: int = 0, target_modules: tuple[str, ...] = ("kohya",)) -> LoraNetwork:
    root = LoraRoot("lora_unet", "unet", unet, is_text_encoder=False, kohya_path=str, peft_path=str)
    network = NetworkConfig(lora_rank=16, conv_rank=conv_rank, target_modules=list(target_modules))
    with torch.device("meta"):
        return LoraNetwork(find_lora_targets([root], network))


def _traced_activation_elements(family: str, checkpointing: bool, conv_rank: int = 0,
                                target_modules: tuple[str, ...] = ("kohya",)) -> int:
    """Elements autograd saves in one sample's forward pass through the full-size UNet with LoRA (fp32, so four
    bytes each)."""
    unet = meta_unet(family).requires_grad_(False)
    lora = _unet_lora(unet, conv_rank, target_modules)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in training mode
    else:
        unet.eval()
    side = LATENT_SIDE[family]
    latents = torch.empty(1, 4, side, side, device="meta")
    context = torch.empty(1, 77, UNET_CONFIGS[family]["cross_attention_dim"], device="meta")
    added = {"text_embeds": torch.empty(1, 1280, device="meta"),
             "time_ids": torch.empty(1, 6, device="meta")} if family == "sdxl" else None
    try:
        with fused_attention(), lora.applied(1.0), saved_bytes(unet, lora) as counted:
            unet(latents, torch.tensor([500], device="meta"), encoder_hidden_states=context, added_cond_kwargs=added)
    finally:
        if checkpointing:
            unet.disable_gradient_checkpointing()
    return counted[0] // 4


def _footprint(family: str, lora_parameters: int = 0) -> ModelFootprint:
    unet, vae = meta_unet(family), meta_vae()
    return ModelFootprint(unet_bytes=tensor_bytes([unet]), unet_fp8_bytes=fp8_bytes(unet),
                          text_encoder_bytes=0, vae_bytes=tensor_bytes([vae]), text_encoder_width_layers=768 * 12,
                          layout=layout_of_diffusers_unet(unet.config), vae_scale=8,
                          lora_parameters=lora_parameters or sum(p.numel() for p in _unet_lora(unet).parameters()))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_meta_device_unets_have_the_published_parameter_counts(family):
    assert sum(parameter.numel() for parameter in meta_unet(family).parameters()) == PUBLISHED_UNET_PARAMETERS[family]
    # fp32 weights: four bytes a parameter.
    assert tensor_bytes([meta_unet(family)]) == 4 * PUBLISHED_UNET_PARAMETERS[family]


def test_the_meta_device_vae_has_the_published_parameter_count():
    assert sum(parameter.numel() for parameter in meta_vae().parameters()) == PUBLISHED_VAE_PARAMETERS


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_activation_count_is_within_its_stated_error_of_a_meta_device_trace(family, checkpointing):
    traced = _traced_activation_elements(family, checkpointing)
    side = LATENT_SIDE[family]
    counted = activation_elements(layout_of_diffusers_unet(meta_unet(family).config), side, side,
                                  checkpointing).kept
    print(f"{family} checkpointing={checkpointing}: traced {traced / 1e6:.1f}M, counted {counted / 1e6:.1f}M "
          f"({counted / traced - 1:+.1%})")
    assert abs(counted / traced - 1) <= TRACE_ERROR


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_count_follows_the_adapted_layers_attention_only_keeps_less(family):
    traced = _traced_activation_elements(family, False, target_modules=("attention",))
    side = LATENT_SIDE[family]
    counted = activation_elements(layout_of_diffusers_unet(meta_unet(family).config), side, side, False,
                                  feed_forward_lora=False, projection_lora=False).kept
    assert abs(counted / traced - 1) <= TRACE_ERROR
    assert traced < _traced_activation_elements(family, False)


def test_the_meta_device_trace_is_stable():
    assert _traced_activation_elements("sd1", False) == _traced_activation_elements("sd1", False)


def test_checkpointing_keeps_far_fewer_activations_and_adds_one_block_recomputed():
    layout = layout_of_diffusers_unet(meta_unet("sdxl").config)
    plain = activation_elements(layout, 128, 128, checkpointing=False)
    checkpointed = activation_elements(layout, 128, 128, checkpointing=True)
    assert plain.recomputed == 0 and checkpointed.recomputed > 0
    assert checkpointed.peak < plain.peak / 5


def test_fp8_storage_counts_one_byte_for_each_linear_and_convolution_weight():
    unet = meta_unet("sd1")
    weights = sum(layer.weight.numel() for layer in unet.modules()
                  if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)))
    assert fp8_bytes(unet) == tensor_bytes([unet]) - 3 * weights


def _sdxl_config(**overrides):
    settings = dict(train_data_dir="data", resolution=1024, batch_size=1, mixed_precision="bf16",
                    gradient_checkpointing=False)
    settings.update(overrides)
    return config_from_dict(settings)


def test_an_estimate_that_fits_has_no_suggestion():
    plan = plan_memory(_sdxl_config(), _footprint("sdxl"), available=80 * GIB)
    assert plan.fits and plan.suggestion is None
    assert "80.0 GB free for it." in plan.line()


def test_the_suggestion_really_lowers_the_estimate_under_the_free_memory():
    config, footprint = _sdxl_config(), _footprint("sdxl")
    available = 12 * GIB
    plan = plan_memory(config, footprint, available)
    assert not plan.fits
    assert plan.suggestion.changes == {"gradient_checkpointing": True}
    assert "turn on gradient checkpointing: ~" in plan.line()
    changed = estimate_memory(config.updated(**plan.suggestion.changes), footprint)
    assert changed.total < plan.estimate.total and changed.total <= available
    assert changed == plan.suggestion.estimate


def test_when_no_single_change_fits_the_savers_are_combined():
    config, footprint = _sdxl_config(batch_size=4, mixed_precision="no"), _footprint("sdxl")
    plan = plan_memory(config, footprint, available=8 * GIB)
    changes = plan.suggestion.changes
    assert changes["gradient_checkpointing"] is True and changes["mixed_precision"] == "bf16"
    assert estimate_memory(config.updated(**changes), footprint).total < plan.estimate.total


def test_a_cpu_run_has_an_estimate_but_no_free_memory_to_compare():
    plan = plan_memory(_sdxl_config(), _footprint("sdxl"), available=None)
    assert plan.fits and "free memory is not known" in plan.line()


def test_caching_and_a_frozen_text_encoder_leave_only_the_unet_s_weights():
    footprint = _footprint("sd1")
    cached = estimate_memory(_sdxl_config(resolution=512), footprint)
    uncached = estimate_memory(_sdxl_config(resolution=512, cache_latents=False), footprint)
    assert cached.weights == footprint.unet_bytes
    assert uncached.weights == footprint.unet_bytes + footprint.vae_bytes
    assert estimate_memory(_sdxl_config(resolution=512, fp8_base=True), footprint).weights == footprint.unet_fp8_bytes


def test_under_autocast_the_normalisation_inputs_count_four_bytes_and_the_rest_two():
    count = activation_elements(layout_of_diffusers_unet(meta_unet("sd1").config), 64, 64, checkpointing=False)
    assert 0 < count.normalised < count.peak
    assert count.bytes(4) == 4 * count.peak
    assert count.bytes(2) == 2 * count.peak + 2 * count.normalised


def test_fp8_storage_keeps_no_convolution_inputs():
    layout = layout_of_diffusers_unet(meta_unet("sd1").config)
    stored = activation_elements(layout, 64, 64, checkpointing=False, convolutions_keep_inputs=False)
    assert stored.peak < activation_elements(layout, 64, 64, checkpointing=False).peak


@pytest.mark.parametrize("part, channels, scale, per_megapixel", [("encoder", 3, 1, 2.5), ("decoder", 4, 8, 3.0)])
def test_the_vaes_peaks_are_traced_per_pixel_and_grow_with_the_pixels(part, channels, scale, per_megapixel):
    vae = meta_vae()
    per_pixel = vae_bytes_per_pixel(vae, part, vae_scale=8)
    with torch.no_grad(), LiveBytes() as live:
        getattr(vae, part)(torch.empty(2, channels, 1024 // scale, 1024 // scale, device="meta"))
    assert live.peak == pytest.approx(2 * 1024 * 1024 * per_pixel, rel=0.01)
    assert 1024 * 1024 * per_pixel == pytest.approx(per_megapixel * GIB, rel=0.05)  # fp32, a megapixel


def _traced_footprint(family: str) -> ModelFootprint:
    vae = meta_vae()
    return replace(_footprint(family), vae_encoder_bytes_per_pixel=vae_bytes_per_pixel(vae, "encoder", 8),
                   vae_decoder_bytes_per_pixel=vae_bytes_per_pixel(vae, "decoder", 8))


def test_caching_many_large_images_per_vae_call_peaks_above_training_and_the_plan_says_what_helps():
    footprint = _traced_footprint("sdxl")
    eight_per_call = plan_memory(_sdxl_config(vae_batch_size=8, gradient_checkpointing=True), footprint, 16 * GIB)
    [caching] = eight_per_call.phase_peaks
    assert caching.estimate.total > eight_per_call.estimate.total and not eight_per_call.fits
    assert caching.estimate.activations == pytest.approx(8 * 2.5 * GIB, rel=0.05)
    assert "caching the latents first" in eight_per_call.line() and "set vae_batch_size 1" in eight_per_call.line()
    one_per_call = plan_memory(_sdxl_config(gradient_checkpointing=True), footprint, 16 * GIB)  # the default at 1024 px
    assert one_per_call.fits and "vae_batch_size" not in one_per_call.line()
    assert not plan_memory(_sdxl_config(vae_batch_size=8, cache_latents=False, gradient_checkpointing=True),
                           footprint, 16 * GIB).phase_peaks


def test_rendering_large_samples_peaks_above_training_and_the_plan_says_what_helps():
    footprint = _traced_footprint("sd1")
    settings = dict(resolution=512, gradient_checkpointing=True)
    large = plan_memory(_sdxl_config(sample_prompts=["a cat --w 2048 --h 2048"], **settings), footprint, 8 * GIB)
    [sampling] = [peak for peak in large.phase_peaks if peak.name == "rendering samples"]
    assert sampling.estimate.total > large.estimate.total and not large.fits
    assert sampling.estimate.activations == pytest.approx(4 * 4 * 0.75 * GIB, rel=0.05)  # the decoder at 4 MP
    assert "render smaller samples" in large.line()
    assert plan_memory(_sdxl_config(sample_prompts=["a cat"], **settings), footprint, 8 * GIB).fits
    unsampled = plan_memory(_sdxl_config(**settings), footprint, 8 * GIB)
    assert "rendering samples" not in unsampled.line()  # no sample prompts
