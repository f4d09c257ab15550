"""The WebUI backend on tiny models built from the real `ldm` classes, shaped as the WebUI loads them."""

from __future__ import annotations

import copy
import hashlib
import re

import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("ldm")

from measures import TINY_SIZES, fixed_noise_loss  # noqa: E402

from lora_trainer.config import NetworkConfig, TrainConfig, config_from_dict  # noqa: E402
from lora_trainer.errors import UserError  # noqa: E402
from lora_trainer.lora.network import LoraNetwork  # noqa: E402
from lora_trainer.lora.targets import find_lora_targets, network_from_file, never_run_keys  # noqa: E402
from lora_trainer.models.webui_backend import WebUIBackend  # noqa: E402
from lora_trainer.train.events import TrainingEvents  # noqa: E402
from lora_trainer.train.loop import train  # noqa: E402
from lora_trainer.train.loss import add_noise  # noqa: E402
from tests.ldm_models import tiny_sd1, tiny_sd2, tiny_sdxl  # noqa: E402
from tests.webui_lora import webui_apply, webui_layer_mapping, webui_module_for, webui_patched_tensors  # noqa: E402

BUILDERS = {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, nn.Module]:
    """One tiny model per family, shared by the tests that leave it as it was (as the bit-identity test checks)."""
    folder = tmp_path_factory.mktemp("ldm-models")
    return {family: build(folder) for family, build in BUILDERS.items()}


def _config(dataset, output_dir, **overrides) -> TrainConfig:
    settings = dict(train_data_dir=dataset, resolution=32, bucket_step=8, lora_rank=4, learning_rate=5e-3,
                    batch_size=2, max_train_steps=2, output_dir=output_dir, logging_dir=None, log_every_n_steps=1)
    settings.update(overrides)
    return config_from_dict(settings)


def _state_hashes(model: nn.Module) -> dict[str, str]:
    return {name: hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
            for name, tensor in model.state_dict().items()}


def _snapshot(model: nn.Module) -> dict:
    """Everything training must leave as it was: weights, tree, flags, modes, hooks and plain attributes."""
    plain = (bool, int, float, str, tuple, type(None))
    return {
        "state": _state_hashes(model),
        "tree": [(name, type(module).__qualname__) for name, module in model.named_modules()],
        "requires_grad": [(name, parameter.requires_grad) for name, parameter in model.named_parameters()],
        "training": [(name, module.training) for name, module in model.named_modules()],
        "hooks": [(name, len(module._forward_hooks), len(module._forward_pre_hooks), len(module._backward_hooks))
                  for name, module in model.named_modules()],
        "attributes": [(name, sorted(vars(module)), {key: value for key, value in vars(module).items()
                                                     if isinstance(value, plain)})
                       for name, module in model.named_modules()],
    }


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_trained_lora_lowers_the_denoising_loss_on_its_training_images(family, models, shapes_dataset, tmp_path):
    backend = WebUIBackend(models[family])
    config = _config(shapes_dataset, tmp_path / "out", max_train_steps=60, learning_rate=2e-2)
    path = train(config, backend).saved[-1]
    network = network_from_file(backend.lora_roots(), path)
    with network.applied(0.0):
        base_loss = fixed_noise_loss(backend, config)
    with network.applied(1.0):
        trained_loss = fixed_noise_loss(backend, config)
    print(f"{family}: loss at strength 0 {base_loss:.4f}, at strength 1 {trained_loss:.4f}")
    # Measured strength-1 / strength-0 loss ratios (60 steps): sd1 0.63, sd2 0.58, sdxl 0.60.
    assert trained_loss < 0.85 * base_loss


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_training_leaves_the_model_bit_identical(family, models, shapes_dataset, tmp_path):
    model = models[family]
    before = _snapshot(model)
    train(_config(shapes_dataset, tmp_path / "out", train_text_encoder=True, gradient_checkpointing=True),
          WebUIBackend(model))
    assert _snapshot(model) == before


def test_train_and_eval_modes_of_a_mixed_tree_are_restored(models, shapes_dataset, tmp_path):
    model = copy.deepcopy(models["sd1"])
    model.model.diffusion_model.middle_block.train()
    before = [(name, module.training) for name, module in model.named_modules()]
    train(_config(shapes_dataset, tmp_path / "out", max_train_steps=1), WebUIBackend(model))
    assert [(name, module.training) for name, module in model.named_modules()] == before


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_gradient_checkpointing_keeps_every_lora_gradient(family, models, shapes_dataset, tmp_path):
    # The tiny UNets are built with ldm's own use_checkpoint=True, which would drop LoRA gradients; SDXL's
    # conditioner runs its text encoders under no_grad unless told otherwise.
    backend = WebUIBackend(models[family])
    config = _config(shapes_dataset, tmp_path / "out", train_text_encoder=True, conv_rank=2)
    network = LoraNetwork(find_lora_targets(backend.lora_roots(), config.network))
    with torch.no_grad():
        for module in network.lora_modules.values():
            module.up.normal_(std=0.1)
    torch.manual_seed(0)
    latents, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    timesteps = torch.tensor([200, 700])

    def lora_gradients(gradient_checkpointing: bool) -> dict[str, torch.Tensor]:
        network.zero_grad(set_to_none=True)
        with backend.training_mode(gradient_checkpointing), network.applied(1.0):
            text = backend.encode_text(["sks, a red shape", "sks, a blue shape"])
            noisy_latents = add_noise(latents, noise, timesteps, backend.alphas_cumprod, backend.prediction_type)
            prediction = backend.predict(noisy_latents, timesteps, text, TINY_SIZES.repeat(2, 1))
            prediction.square().mean().backward()
        return {name: parameter.grad.clone() for name, parameter in network.named_parameters()
                if parameter.grad is not None}

    plain, checkpointed = lora_gradients(False), lora_gradients(True)
    assert {name for name, _ in network.named_parameters()} == plain.keys()
    assert any("lora_te" in name for name in plain)
    assert all(gradient.abs().sum() > 0 for gradient in plain.values())
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[name], checkpointed[name], rtol=1e-4, atol=1e-7) for name in plain)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a_lora_merged_by_the_webui_is_undone_before_training(family, models, shapes_dataset, tmp_path):
    model = copy.deepcopy(models[family])
    clean = _state_hashes(model)
    generator = torch.Generator().manual_seed(0)
    # The extension patches these layer types among the layers it names (an attention's out_proj goes with it).
    layers = [module for module in webui_layer_mapping(model).values()
              if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention))
              and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)]
    deltas = {layer: [torch.randn(p.shape, generator=generator) * 0.01 for p in webui_patched_tensors(layer)]
              for layer in layers}
    for layer in layers:
        webui_apply(layer, deltas[layer], ("merged", 1.0, 1.0, None))
    merged = _state_hashes(model)
    assert merged != clean
    if family == "sd2":
        assert any(isinstance(layer, nn.MultiheadAttention) for layer in layers)

    class StateAtStart(TrainingEvents):
        def on_start(self, plan):
            self.hashes = _state_hashes(model)

    at_start = StateAtStart()
    train(_config(shapes_dataset, tmp_path / "out", max_train_steps=1), WebUIBackend(model), at_start)
    # The cached VAE and text encoder are parked (empty) while training; everything else is the clean weights.
    parked = hashlib.sha256(b"").hexdigest()
    in_use = {name: digest for name, digest in at_start.hashes.items() if digest != parked}
    assert in_use == {name: clean[name] for name in in_use}
    assert all(name in in_use for name in clean if name.startswith("model.diffusion_model."))
    assert _state_hashes(model) == clean
    assert all(layer.network_current_names == () for layer in layers)
    # The extension kept its backups, so its next generation with the same LoRA merges it exactly as before.
    for layer in layers:
        webui_apply(layer, deltas[layer], ("merged", 1.0, 1.0, None))
    assert _state_hashes(model) == merged


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_exported_keys_name_the_trained_layers_as_the_webui_maps_them(family, models, shapes_dataset, tmp_path):
    from safetensors import safe_open

    model = models[family]
    backend = WebUIBackend(model)
    unet_targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "emb_layers.1", "skip_connection", "time_embed.0", "time_embed.2", "label_emb.0.0"]
    config = _config(shapes_dataset, tmp_path / "out", max_train_steps=1, conv_rank=2, train_text_encoder=True,
                     target_modules=unet_targets,
                     text_encoder_target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    # The extension finds an OpenCLIP attention's q/k/v LoRA on the attention, and its out LoRA on out_proj.
    trained_layers = {target.key: target.layer.out_proj if target.part == "out" else target.layer
                      for target in find_lora_targets(backend.lora_roots(), config.network)}
    path = train(config, backend).saved[-1]
    with safe_open(str(path), "pt") as handle:
        file_keys = {key.partition(".")[0] for key in handle.keys()}

    mapping = webui_layer_mapping(model)
    unmatched = sorted(key for key in file_keys if webui_module_for(key, mapping) is None)
    assert unmatched == []
    assert file_keys == trained_layers.keys()
    assert all(webui_module_for(key, mapping) is trained_layers[key] for key in file_keys)
    unet_style = "lora_unet_input_blocks_" if family == "sdxl" else "lora_unet_down_blocks_"
    assert any(key.startswith(unet_style) for key in file_keys)
    assert any(key.startswith("lora_te1_" if family == "sdxl" else "lora_te_") for key in file_keys)
    if family != "sd1":
        open_clip_prefix = "lora_te2_" if family == "sdxl" else "lora_te_"
        assert {f"{open_clip_prefix}text_model_encoder_layers_0_{layer}" for layer in
                ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1",
                 "mlp_fc2"]} <= file_keys


def test_sdxl_size_vector_matches_the_webui_conditioning_for_its_default_sizes(models):
    model = models["sdxl"]
    backend = WebUIBackend(model)
    captions = ["sks, a red shape", "a blue shape"]
    latents, timesteps = torch.randn(2, 4, 16, 16), torch.tensor([100, 800])
    with torch.no_grad():
        webui = model.apply_model(latents, timesteps, model.get_learned_conditioning(captions))
        ours = backend.predict(latents, timesteps, backend.encode_text(captions),
                               torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(2, 1))
        other_size = backend.predict(latents, timesteps, backend.encode_text(captions), TINY_SIZES.repeat(2, 1))
    assert torch.equal(ours, webui)
    assert not torch.allclose(other_size, webui)


def test_fp8_weights_are_refused_with_a_clear_message(models):
    model = copy.deepcopy(models["sd1"])
    layer = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(UserError, match="FP8.*turn off Settings > Optimizations > FP8 weight"):
        WebUIBackend(model)


def test_inpainting_models_are_refused_with_a_clear_message(models):
    model = copy.deepcopy(models["sd1"])
    unet = model.model.diffusion_model
    unet.in_channels, unet.input_blocks[0][0] = 9, nn.Conv2d(9, 32, 3, padding=1)
    with pytest.raises(UserError, match="9 input channels.*load a plain text-to-image checkpoint"):
        WebUIBackend(model)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_openclip_text_encoder_lora_acts_as_the_webui_merges_it(family, models, shapes_dataset, tmp_path):
    from safetensors.torch import load_file

    model = copy.deepcopy(models[family])
    backend = WebUIBackend(model)
    config = _config(shapes_dataset, tmp_path / "out", max_train_steps=3, train_text_encoder=True)
    path = train(config, backend).saved[-1]
    network = network_from_file(backend.lora_roots(), path)
    captions = ["sks, a red shape", "a blue shape on white"]
    with torch.no_grad():
        base = backend.encode_text(captions)
        with network.applied(0.7):
            ours = backend.encode_text(captions)

    # The extension's way: each layer's up @ down * alpha / rank * strength, added to its weights in place;
    # an attention's q/k/v deltas stacked into in_proj_weight.
    state, mapping = load_file(str(path)), webui_layer_mapping(model)
    deltas: dict[nn.Module, dict[str, torch.Tensor]] = {}
    for key in {name.partition(".")[0] for name in state if name.startswith("lora_te")}:
        delta = state[f"{key}.lora_up.weight"] @ state[f"{key}.lora_down.weight"]
        delta = delta * float(state[f"{key}.alpha"]) / state[f"{key}.lora_down.weight"].shape[0] * 0.7
        module = webui_module_for(key, mapping)
        part = re.search(r"_([qkv])_proj$", key)[1] if isinstance(module, nn.MultiheadAttention) else "weight"
        deltas.setdefault(module, {})[part] = delta
    attentions = [module for module in deltas if isinstance(module, nn.MultiheadAttention)]
    assert attentions
    for attention in attentions:
        parts, out_proj = deltas.pop(attention), deltas.pop(attention.out_proj)
        webui_apply(attention, [torch.cat([parts["q"], parts["k"], parts["v"]]), out_proj["weight"],
                                 torch.zeros_like(attention.out_proj.bias)], ("trained", 0.7, 1.0, None))
    for module, parts in deltas.items():
        bias = [torch.zeros_like(module.bias)] if module.bias is not None else []
        webui_apply(module, [parts["weight"], *bias], ("trained", 0.7, 1.0, None))
    with torch.no_grad():
        merged = backend.encode_text(captions)

    assert not torch.allclose(ours.context, base.context, atol=1e-4)
    assert torch.allclose(ours.context, merged.context, rtol=1e-4, atol=1e-5)
    if family == "sdxl":
        assert not torch.allclose(ours.pooled, base.pooled, atol=1e-4)
        assert torch.allclose(ours.pooled, merged.pooled, rtol=1e-4, atol=1e-5)


def test_openclip_attention_needs_all_four_projections(models, shapes_dataset, tmp_path):
    config = _config(shapes_dataset, tmp_path / "out", train_text_encoder=True,
                     text_encoder_target_modules=["q_proj", "v_proj"])
    with pytest.raises(UserError, match="q_proj, k_proj, v_proj and out_proj together"):
        train(config, WebUIBackend(models["sd2"]))
    assert not (tmp_path / "out").exists()


def test_lora_dropout_on_openclip_attention_is_refused_with_a_clear_message(models, shapes_dataset, tmp_path):
    config = _config(shapes_dataset, tmp_path / "out", train_text_encoder=True, lora_dropout=0.1)
    with pytest.raises(UserError, match="lora_dropout.*OpenCLIP"):
        train(config, WebUIBackend(models["sdxl"]))


def test_lowvram_is_refused_with_a_clear_message(models):
    with pytest.raises(UserError, match="--lowvram"):
        WebUIBackend(models["sd1"], lowvram=True)


def test_sample_images_come_from_the_host_generator(models):
    calls = []

    def render(*arguments):
        calls.append(arguments)
        return Image.new("RGB", (32, 32))

    WebUIBackend(models["sd1"], generate_image=render).generate("a cat", "blurry", 7, 20, 32, 32, 5.0)
    assert calls == [("a cat", "blurry", 7, 20, 32, 32, 5.0)]
    with pytest.raises(UserError, match="sample_prompts"):
        WebUIBackend(models["sd1"]).generate("a cat", "", 7, 20, 32, 32, 5.0)


def test_model_name_comes_from_the_loaded_checkpoint(models, monkeypatch):
    model = models["sd1"]
    assert WebUIBackend(model, model_name="fallback").model_name == "fallback"
    monkeypatch.setattr(model, "sd_checkpoint_info", type("CheckpointInfo", (), {"model_name": "tiny-sd1"})(),
                        raising=False)
    assert WebUIBackend(model, model_name="fallback").model_name == "tiny-sd1"


@pytest.mark.parametrize("family,clip_skip,never_run", [
    ("sd1", None, None), ("sd1", 2, "lora_te_text_model_encoder_layers_1_"),
    ("sd2", None, "lora_te_text_model_encoder_layers_1_"), ("sdxl", None, "lora_te1_text_model_encoder_layers_1_")])
def test_text_encoder_layers_the_model_never_runs_are_not_adapted(family, clip_skip, never_run, models):
    # SD2 and SDXL's first encoder are read at the penultimate layer, SD1 at the one Clip skip names: their
    # later layers run for nothing (SDXL's second encoder's last layer makes its pooled output).
    backend = WebUIBackend(models[family], clip_skip=clip_skip)
    adapted = {target.key for target in find_lora_targets(backend.lora_roots(),
                                                          NetworkConfig(train_text_encoder=True))}
    never = never_run_keys(backend.lora_roots())
    assert len(never) == (6 if never_run else 0)  # q, k, v, out, fc1, fc2 of one layer
    assert all(key.startswith(never_run) for key in never)
    assert not adapted & never
    assert any(key.startswith(("lora_te_", "lora_te1_")) for key in adapted)


def test_the_hosts_clip_skip_is_recorded_in_the_file(models, shapes_dataset, tmp_path):
    from safetensors import safe_open

    def clip_skip_of(backend: WebUIBackend, name: str) -> str:
        path = train(_config(shapes_dataset, tmp_path / "out", max_train_steps=1, output_name=name), backend).saved[-1]
        with safe_open(str(path), "pt") as handle:
            return handle.metadata()["ss_clip_skip"]

    assert clip_skip_of(WebUIBackend(models["sd1"], clip_skip=2), "skip2") == "2"
    assert clip_skip_of(WebUIBackend(models["sd1"]), "unset") == "None"


def test_parking_the_cached_vae_and_text_encoder_leaves_every_tensor_as_it_was(models, shapes_dataset, tmp_path):
    model = models["sdxl"]
    before = _snapshot(model)
    devices = [(name, tensor.device, tensor.dtype) for name, tensor in model.state_dict(keep_vars=True).items()]
    train(_config(shapes_dataset, tmp_path / "out", max_train_steps=1), WebUIBackend(model))
    assert _snapshot(model) == before
    assert [(name, tensor.device, tensor.dtype) for name, tensor in model.state_dict(keep_vars=True).items()] == devices


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_unet_layout_is_read_from_the_original_module_tree(family, models):
    from lora_trainer.models.layout import UNetLayout

    unet = models[family].model.diffusion_model
    channels = tuple(unet.model_channels * multiplier for multiplier in unet.channel_mult)
    context = 64 if family == "sdxl" else 32
    # The tiny SD1/SD2 UNets attend at the finest level, the tiny SDXL one at the second (as SDXL's first has none).
    attending = (0, 1) if family == "sdxl" else (1, 0)
    assert WebUIBackend(models[family]).unet_layout() == UNetLayout(channels, 2, attending, 1, context, family != "sd1")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fp8_storage_trains_the_loaded_model_and_leaves_it_bit_identical(family, models, shapes_dataset, tmp_path):
    from lora_trainer.models.fp8 import FP8

    model = models[family]
    before = _snapshot(model)
    stored = set()

    class Watch(TrainingEvents):
        def on_start(self, plan):
            stored.update(layer.weight.dtype for layer in model.model.diffusion_model.modules()
                          if isinstance(layer, (nn.Linear, nn.Conv2d)))

    result = train(_config(shapes_dataset, tmp_path / "out", fp8_base=True), WebUIBackend(model), Watch())
    assert stored == {FP8} and result.last_loss is not None
    assert _snapshot(model) == before


@pytest.mark.parametrize("network_type", ["lora", "loha", "lokr", "dora"])
def test_the_memory_plan_counts_the_lora_parameters_without_moving_the_random_stream(network_type, models):
    from lora_trainer.train.memory import lora_parameter_count

    # SD2's OpenCLIP attention takes every type but dora, which SD1's CLIP takes.
    backend = WebUIBackend(models["sd1" if network_type == "dora" else "sd2"])
    network = config_from_dict({"network_type": network_type, "lora_rank": 4, "conv_rank": 2,
                                "train_text_encoder": True}).network
    torch.manual_seed(0)
    counted = lora_parameter_count(backend, network)
    drawn = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), drawn)
    built = LoraNetwork(find_lora_targets(backend.lora_roots(), network))
    assert counted == sum(parameter.numel() for parameter in built.parameters())
