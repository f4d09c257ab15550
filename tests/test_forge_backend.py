"""The Forge backend on tiny models built from Forge's own classes (tests/forge_models.py: skipped without
Forge's source)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.config import TrainConfig
from lora_trainer.errors import UserError
from lora_trainer.models.forge_backend import ForgeBackend
from lora_trainer.train.events import TrainingEvents
from lora_trainer.train.loop import train
from tests.forge_models import (
    forge_lora_patches,
    forge_snapshot,
    forge_state_hashes,
    loss_without_and_with_the_file,
    predictions_with_the_file,
    prompt_with_loras,
    tiny_forge_engine,
    tiny_run_config,
)

FAMILIES = ["sd1", "sd2", "sdxl"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict:
    """One tiny Forge engine per family, each having rendered one image, as Forge does before any training
    (its memory manager marks what it loaded)."""
    from fake_forge_host import euler_sample

    from lora_trainer.tiny import write_clip_tokenizer_files

    tokenizer_folder = write_clip_tokenizer_files(tmp_path_factory.mktemp("forge-tokenizer"))
    engines = {family: tiny_forge_engine(family, tokenizer_folder) for family in FAMILIES}
    for engine in engines.values():
        euler_sample(engine, "a warm-up prompt", seed=0, steps=1, width=32, height=32)
    return engines


def _config(dataset, output_dir, **overrides) -> TrainConfig:
    return tiny_run_config(dataset, output_dir, **overrides)


def test_the_tiny_models_are_forge_models_loaded_in_inference_mode(engines):
    from backend.operations import ForgeOperations

    unet = engines["sd1"].forge_objects.unet.model.diffusion_model
    linears = [module for module in unet.modules() if isinstance(module, ForgeOperations.Linear)]
    assert linears and not any(isinstance(module, torch.nn.Linear) for module in linears)
    assert any(parameter.is_inference() for parameter in unet.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_lora_lowers_the_denoising_loss_on_its_training_images(family, engines, shapes_dataset, tmp_path):
    backend = ForgeBackend(engines[family])
    config = _config(shapes_dataset, tmp_path / "out", max_train_steps=40, learning_rate=2e-2)
    base_loss, trained_loss = loss_without_and_with_the_file(backend, config, train(config, backend).saved[-1])
    print(f"{family}: loss at strength 0 {base_loss:.4f}, at strength 1 {trained_loss:.4f}")
    assert trained_loss < 0.85 * base_loss


@pytest.mark.parametrize("family", FAMILIES)
def test_training_leaves_the_model_bit_identical(family, engines, shapes_dataset, tmp_path):
    engine = engines[family]
    before = forge_snapshot(engine)
    train(_config(shapes_dataset, tmp_path / "out", train_text_encoder=True, gradient_checkpointing=True,
                  conv_rank=2), ForgeBackend(engine))
    assert forge_snapshot(engine) == before


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_files_load_in_forge_with_no_unmatched_key(family, engines, shapes_dataset, tmp_path):
    backend = ForgeBackend(engines[family])
    config = _config(shapes_dataset, tmp_path / "out", max_train_steps=1, train_text_encoder=True, conv_rank=2,
                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                     "ff.net.2", "emb_layers.1", "skip_connection", "time_embed.0", "time_embed.2"],
                     text_encoder_target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    path = train(config, backend).saved[-1]
    unet_patches, clip_patches, unmatched = forge_lora_patches(engines[family], path)
    assert unmatched == {}
    layers = {key.partition(".")[0] for key in load_file(str(path))}
    assert len(unet_patches) + len(clip_patches) == len(layers)
    assert {key.split(".")[0] for key in clip_patches} == ({"clip_l", "clip_g"} if family == "sdxl"
                                                           else {"clip_h" if family == "sd2" else "clip_l"})


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_forge_applies_the_file_as_the_trainer_did(family, engines, shapes_dataset, tmp_path):
    engine = engines[family]
    backend = ForgeBackend(engine)
    config = _config(shapes_dataset, tmp_path / "out", max_train_steps=3, learning_rate=5e-2, train_text_encoder=True)
    path = train(config, backend).saved[-1]
    torch.manual_seed(0)
    hooked, base, (merged,) = predictions_with_the_file(engine, backend, path, torch.randn(1, 4, 16, 16),
                                                        torch.tensor([500]), strengths=(1.0,))
    assert not torch.allclose(hooked, base, atol=1e-4)
    torch.testing.assert_close(merged, hooked, atol=1e-4, rtol=1e-3)


def test_a_lora_merged_by_forge_is_undone_for_training_and_merged_again_afterwards(engines, shapes_dataset,
                                                                                    tmp_path):
    engine = engines["sd1"]
    backend = ForgeBackend(engine)
    clean = forge_state_hashes(engine)
    lora = train(_config(shapes_dataset, tmp_path / "first", max_train_steps=2, learning_rate=5e-2,
                         train_text_encoder=True), backend).saved[-1]
    prompt_with_loras(engine, [(lora, 1.0)])
    merged = forge_state_hashes(engine)
    patchers = (engine.forge_objects.unet, engine.forge_objects.clip)
    assert merged != clean

    class StateAtStart(TrainingEvents):
        def on_start(self, plan):
            self.hashes = forge_state_hashes(engine)

    at_start = StateAtStart()
    train(_config(shapes_dataset, tmp_path / "second", max_train_steps=1), ForgeBackend(engine), at_start)
    assert at_start.hashes == clean
    assert (engine.forge_objects.unet, engine.forge_objects.clip) == patchers
    # The next generation with that LoRA loads its patchers, and Forge merges it again.
    from backend import memory_management

    memory_management.load_models_gpu([patchers[0], patchers[1].patcher])
    assert forge_state_hashes(engine) == merged
    prompt_with_loras(engine, [])
    assert forge_state_hashes(engine) == clean


def test_quantized_weights_are_refused_with_what_to_do(engines):
    engine = copy.copy(engines["sd1"])
    k_model = engine.forge_objects_original.unet.model
    storage = k_model.storage_dtype
    k_model.storage_dtype = "nf4"
    try:
        with pytest.raises(UserError, match="quantized"):
            ForgeBackend(engine)
    finally:
        k_model.storage_dtype = storage


def test_the_vae_fingerprint_follows_forges_vae_and_its_latent_scaling(engines):
    backend = ForgeBackend(engines["sd1"])
    vae = engines["sd1"].forge_objects_original.vae.first_stage_model
    fingerprint = backend.vae_fingerprint()
    assert backend.vae_fingerprint() == fingerprint
    scaling = vae.scaling_factor
    vae.scaling_factor = scaling * 2
    try:
        assert backend.vae_fingerprint() != fingerprint
    finally:
        vae.scaling_factor = scaling


def test_fp8_base_is_refused_and_the_memory_plan_reads_forges_unet(engines, shapes_dataset, tmp_path):
    from lora_trainer.models.layout import layout_of_original_unet

    backend = ForgeBackend(engines["sdxl"])
    unet = backend.unet
    assert layout_of_original_unet(unet).level_channels == tuple(unet.model_channels * m for m in unet.channel_mult)
    with pytest.raises(UserError, match="fp8_base"):
        train(_config(shapes_dataset, tmp_path / "out", max_train_steps=1, fp8_base=True), backend)


def test_the_memory_plan_counts_the_plain_copies_forges_inference_weights_need_while_training(engines):
    from lora_trainer.config import config_from_dict
    from lora_trainer.train.memory import estimate_memory, model_footprint

    backend = ForgeBackend(engines["sd1"])
    trees = [backend.model_parts().unet, *backend.model_parts().text_encoders]
    in_inference_mode = {(index, name) for index, tree in enumerate(trees)
                         for name, parameter in tree.named_parameters() if parameter.is_inference()}
    with backend.training_mode(gradient_checkpointing=False):
        copied = sum(parameter.numel() * parameter.element_size() for index, tree in enumerate(trees)
                     for name, parameter in tree.named_parameters()
                     if (index, name) in in_inference_mode and not parameter.is_inference())
    footprint = model_footprint(backend, config_from_dict({}).network)
    assert footprint.training_copy_bytes == copied >= footprint.unet_bytes  # the UNet's weights at least
    config = config_from_dict({"train_data_dir": "data"})
    assert estimate_memory(config, footprint).weights == \
        footprint.unet_bytes + footprint.text_encoder_bytes + footprint.vae_bytes + copied
