"""Flux in Forge: a tiny Flux-dev engine built from Forge's own classes (tests/forge_models.py, skipped without
Forge's source), in 32-bit weights and loaded from a Q8_0 .gguf file, trained through the Forge backend and read
back by Forge's own LoRA loader."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors import safe_open

from lora_trainer.config import FLUX_BLOCK_LAYERS, TrainConfig
from lora_trainer.errors import UserError
from lora_trainer.lora.naming import kohya_key
from lora_trainer.models.forge_backend import forge_backend
from lora_trainer.models.forge_flux import ForgeFluxBackend
from lora_trainer.models.layout import TransformerLayout
from lora_trainer.train.events import TrainingEvents
from lora_trainer.train.loop import train
from lora_trainer.train.loss import add_noise, diffusion_target
from lora_trainer.train.memory import plan_run_memory, transformer_activation_elements
from tests.forge_models import (
    FLUX_CONFIG,
    forge_lora_patches,
    forge_snapshot,
    loss_without_and_with_the_file,
    predictions_with_the_file,
    tiny_forge_flux_engine,
    tiny_run_config,
)
from tests.measures import TINY_SIZES


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny Forge Flux-dev engine that has rendered one image, as Forge does before any training."""
    from fake_forge_host import euler_sample

    from lora_trainer.tiny import write_clip_tokenizer_files

    engine = tiny_forge_flux_engine(write_clip_tokenizer_files(tmp_path_factory.mktemp("forge-tokenizer")))
    euler_sample(engine, "a warm-up prompt", seed=0, steps=1, width=32, height=32)
    return engine


def _config(dataset, output_dir, **overrides) -> TrainConfig:
    """Flux's patches are 2x2 latent cells: buckets in steps of 16 px."""
    return tiny_run_config(dataset, output_dir, **({"bucket_step": 16, "learning_rate": 2e-2} | overrides))


def test_forge_backend_gives_a_flux_engine_the_flux_backend(engine):
    from backend.nn.flux import IntegratedFluxTransformer2DModel

    backend = forge_backend(engine, clip_skip=2)
    assert isinstance(backend, ForgeFluxBackend)
    assert isinstance(backend.unet, IntegratedFluxTransformer2DModel)
    assert (backend.family, backend.prediction_type, backend.clip_skip) == ("flux", "flow", None)
    assert backend.flow_shift == pytest.approx(1.15)  # Forge's Flux-dev mu, at its 4096-token sequence
    assert any(parameter.is_inference() for parameter in backend.unet.parameters())


def test_a_flux_schnell_engine_trains_without_guidance_at_forges_shift_into_a_schnell_file(shapes_dataset, tmp_path):
    from lora_trainer.tiny import write_clip_tokenizer_files

    engine = tiny_forge_flux_engine(write_clip_tokenizer_files(tmp_path / "tokenizer"), schnell=True)
    backend = forge_backend(engine)
    assert not backend.unet.guidance_embed and backend.flow_shift == 1.0
    result = train(_config(shapes_dataset, tmp_path / "out"), backend)
    assert result.steps == 2 and math.isfinite(result.last_loss)
    with safe_open(str(result.saved[-1]), "pt") as saved:
        assert saved.metadata()["modelspec.architecture"] == "flux-1-schnell/lora"


def test_a_caption_over_255_t5_tokens_shares_a_batch_cached_or_encoded_every_step(engine, shapes_dataset, tmp_path):
    """Forge's T5 engine gives it more positions than the others' 256 (and cannot stack the two itself)."""
    long_caption, short_caption = "a red square on a plain ground " * 50, "a blue circle"
    sorted(shapes_dataset.rglob("*.txt"))[0].write_text(long_caption)
    backend = forge_backend(engine)
    with torch.no_grad():
        alone = [engine.text_processing_engine_t5([caption]) for caption in (long_caption, short_caption)]
        batch = backend.encode_text([long_caption, short_caption]).context
    assert alone[0].shape[1] > 256 == alone[1].shape[1] and batch.shape[1] == alone[0].shape[1]
    torch.testing.assert_close(batch[:1], alone[0])
    torch.testing.assert_close(batch[1:, :256], alone[1])
    for train_text_encoder in (False, True):
        result = train(_config(shapes_dataset, tmp_path / f"te-{train_text_encoder}", max_train_steps=4,
                               train_text_encoder=train_text_encoder), backend)
        assert result.steps == 4 and math.isfinite(result.last_loss)


def test_the_training_target_and_inputs_are_what_forges_flux_sampler_reads(engine):
    backend = forge_backend(engine)
    k_model = engine.forge_objects_original.unet.model
    torch.manual_seed(0)
    latents, noise, sigmas = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.8])
    noisy = add_noise(latents, noise, sigmas, None, "flow")
    torch.testing.assert_close(noisy, k_model.predictor.noise_scaling(sigmas.view(2, 1, 1, 1), noise, latents))
    target = diffusion_target(latents, noise, sigmas, None, "flow")
    torch.testing.assert_close(k_model.predictor.calculate_denoised(sigmas, target, noisy), latents)
    forge_conditioning = engine.get_learned_conditioning(["sks, a red shape", "a blue shape"])
    with backend.training_mode(False), torch.no_grad():
        text = backend.encode_text(["sks, a red shape", "a blue shape"])
        denoised = k_model.apply_model(noisy, sigmas, c_crossattn=text.context, y=text.pooled,
                                       guidance=torch.ones(2), transformer_options={})
        predicted = backend.predict(noisy, sigmas, text, TINY_SIZES)
    torch.testing.assert_close(text.context, forge_conditioning["crossattn"])
    torch.testing.assert_close(text.pooled, forge_conditioning["vector"])
    torch.testing.assert_close(noisy - sigmas.view(2, 1, 1, 1) * predicted, denoised)


def test_trained_lora_lowers_the_flow_matching_loss_on_its_training_images(engine, shapes_dataset, tmp_path):
    backend = forge_backend(engine)
    config = _config(shapes_dataset, tmp_path / "out", max_train_steps=40)
    base_loss, trained_loss = loss_without_and_with_the_file(backend, config, train(config, backend).saved[-1])
    print(f"flux: loss at strength 0 {base_loss:.4f}, at strength 1 {trained_loss:.4f}")
    assert trained_loss < 0.85 * base_loss


def test_training_leaves_the_flux_model_bit_identical(engine, shapes_dataset, tmp_path):
    before = forge_snapshot(engine)
    result = train(_config(shapes_dataset, tmp_path / "out", train_text_encoder=True, gradient_checkpointing=True,
                           validation_split=0.25, sample_prompts=["sks, a red shape"], sample_steps=2),
                   forge_backend(engine, generate_image=_euler_render(engine)))
    assert forge_snapshot(engine) == before
    assert result.validation_losses and len(result.samples) == 1


def _euler_render(engine):
    from fake_forge_host import euler_sample

    return lambda prompt, negative, seed, steps, width, height, guidance: euler_sample(engine, prompt, seed, steps,
                                                                                        width, height)


def test_saved_flux_files_carry_kohyas_names_and_load_in_forge_with_no_unmatched_key(engine, shapes_dataset,
                                                                                      tmp_path):
    backend = forge_backend(engine)
    path = train(_config(shapes_dataset, tmp_path / "out", max_train_steps=1, train_text_encoder=True),
                 backend).saved[-1]
    unet_patches, clip_patches, unmatched = forge_lora_patches(engine, path)
    assert unmatched == {}
    with safe_open(str(path), "pt") as saved:
        layers = {key.partition(".")[0] for key in saved.keys()}
        metadata = saved.metadata()
    blocks = [f"double_blocks.{index}" for index in range(FLUX_CONFIG["depth"])] + \
             [f"single_blocks.{index}" for index in range(FLUX_CONFIG["depth_single_blocks"])]
    expected = {kohya_key("lora_unet", f"{block}.{layer}") for block in blocks for layer in FLUX_BLOCK_LAYERS
                if (layer in ("linear1", "linear2", "modulation.lin")) == block.startswith("single")}
    assert {layer for layer in layers if layer.startswith("lora_unet")} == expected
    assert "lora_unet_double_blocks_0_img_attn_qkv" in expected
    assert len(unet_patches) + len(clip_patches) == len(layers)
    assert {key.split(".")[0] for key in clip_patches} == {"clip_l"}
    assert (metadata["ss_base_model_version"], metadata["modelspec.architecture"]) == ("flux1", "flux-1-dev/lora")


def test_forge_applies_the_flux_file_at_strength_one_and_leaves_the_base_at_zero(engine, shapes_dataset, tmp_path):
    backend = forge_backend(engine)
    path = train(_config(shapes_dataset, tmp_path / "out", max_train_steps=3, learning_rate=5e-2), backend).saved[-1]
    torch.manual_seed(0)
    hooked, base, (merged, at_zero) = predictions_with_the_file(engine, backend, path, torch.randn(1, 16, 16, 16),
                                                                torch.tensor([0.5]), strengths=(1.0, 0.0))
    assert not torch.allclose(merged, base, atol=1e-4)
    torch.testing.assert_close(merged, hooked, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(at_zero, base, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def gguf_engine(tmp_path_factory):
    """The tiny Flux-dev engine loaded from a .gguf file whose linear weights are Q8_0, as Forge loads one."""
    from fake_forge_host import euler_sample

    from lora_trainer.tiny import write_clip_tokenizer_files

    folder = tmp_path_factory.mktemp("forge-gguf")
    engine = tiny_forge_flux_engine(write_clip_tokenizer_files(folder), gguf_file=folder / "tiny-flux-q8_0.gguf")
    # Forge bakes the gguf weights at their first load, inside process_images' inference mode.
    with torch.inference_mode():
        euler_sample(engine, "a warm-up prompt", seed=0, steps=1, width=32, height=32)
    return engine


def test_a_gguf_flux_trains_on_its_dequantized_weights_and_is_left_bit_identical(gguf_engine, shapes_dataset,
                                                                                   tmp_path):
    from backend.operations_gguf import ParameterGGUF

    transformer = gguf_engine.forge_objects_original.unet.model.diffusion_model
    quantized = {name: parameter for name, parameter in transformer.named_parameters()
                 if getattr(parameter, "gguf_cls", None) is not None}
    assert quantized and all(isinstance(parameter, ParameterGGUF) and parameter.is_inference()
                             for parameter in quantized.values())
    before = forge_snapshot(gguf_engine)

    class QuantizedAtStart(TrainingEvents):
        def on_start(self, plan):
            self.kept = all(dict(transformer.named_parameters())[name] is parameter
                            for name, parameter in quantized.items())

    at_start = QuantizedAtStart()
    backend = forge_backend(gguf_engine)
    config = _config(shapes_dataset, tmp_path / "out", max_train_steps=40, gradient_checkpointing=True)
    path = train(config, backend, at_start).saved[-1]
    assert at_start.kept  # no plain copy of a quantized weight
    assert forge_snapshot(gguf_engine) == before
    base_loss, trained_loss = loss_without_and_with_the_file(backend, config, path)
    print(f"flux gguf: loss at strength 0 {base_loss:.4f}, at strength 1 {trained_loss:.4f}")
    assert trained_loss < 0.85 * base_loss
    torch.manual_seed(0)
    hooked, base, (merged,) = predictions_with_the_file(gguf_engine, backend, path, torch.randn(1, 16, 16, 16),
                                                        torch.tensor([0.5]), strengths=(1.0,))
    # Forge merges the LoRA into the Q8_0 weights and quantizes them again: close to the hooked output, not equal.
    assert (merged - hooked).abs().max() < 0.01 * (hooked - base).abs().max()


@pytest.mark.parametrize(("storage", "named"), [("nf4", "bitsandbytes"), ("fp4", "bitsandbytes"),
                                                (torch.float8_e4m3fn, "fp8")])
def test_a_quantized_flux_checkpoint_is_refused_by_its_type(engine, storage, named):
    engine = copy.copy(engine)
    k_model = engine.forge_objects_original.unet.model
    kept = k_model.storage_dtype
    k_model.storage_dtype = storage
    try:
        with pytest.raises(UserError, match=named):
            forge_backend(engine)
    finally:
        k_model.storage_dtype = kept


@pytest.mark.parametrize(("setting", "named"), [({"min_snr_gamma": 5.0}, "min_snr_gamma"),
                                                ({"save_diffusers_format": True}, "save_diffusers_format")])
def test_settings_flux_cannot_follow_are_refused(engine, shapes_dataset, tmp_path, setting, named):
    with pytest.raises(UserError, match=named):
        train(_config(shapes_dataset, tmp_path / "out", **setting), forge_backend(engine))


def test_the_memory_plan_counts_flux_weights_lora_and_activations(engine, shapes_dataset, tmp_path):
    estimate = plan_run_memory(_config(shapes_dataset, tmp_path / "out"), forge_backend(engine)).estimate
    assert estimate.weights > 0 and estimate.lora > 0 and estimate.activations > 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flux_activations_are_counted_near_a_meta_device_trace(engine, checkpointing):
    from tests.full_size import FLUX_DEV, flux_saved_bytes, meta_flux

    # Full width, fewer blocks: the count is per block.
    layout = TransformerLayout(FLUX_DEV["hidden_size"], double_blocks=2, single_blocks=3, text_tokens=256,
                               patch_size=2)
    traced = flux_saved_bytes(meta_flux(layout.double_blocks, layout.single_blocks), 512, checkpointing)
    counted = 2 * transformer_activation_elements(layout, 64, 64, checkpointing).kept
    print(f"checkpointing {checkpointing}: counted {counted / 2**20:.0f} MiB, traced {traced / 2**20:.0f} MiB")
    if checkpointing:  # each block's input, counted whole (the trace finds some shared with the next block)
        assert traced <= counted <= 1.5 * traced
    else:
        assert abs(counted / traced - 1) < 0.05
