"""Tiny SD1, SD2 and SDXL models built from Stable Diffusion WebUI Forge's own classes, loaded the way Forge
loads a checkpoint (its operations, patchers, memory manager and diffusion engines, under inference mode).

Forge is not a package on PyPI: its source comes from a Forge checkout named by `LORA_TRAINER_FORGE_SOURCE`
(the repository root, with `huggingface_guess/` from lllyasviel/huggingface_guess beside `backend/`). Without
it the Forge tests skip and say so. `./dev test` points the variable at `$LORA_TRAINER_ENVS/forge-source`
when that folder exists. Only the WebUI's settings object (`modules.shared.opts`, which Forge's text engines
read) is stood in for: it belongs to the WebUI host, not to Forge's model code.
"""

from __future__ import annotations

import hashlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

FORGE_SOURCE_VARIABLE = "LORA_TRAINER_FORGE_SOURCE"
HIDDEN = 32
"""Width of every tiny text encoder."""


def import_forge() -> None:
    """Put Forge's source on the import path (or skip the test), with the CPU as its device."""
    source = os.environ.get(FORGE_SOURCE_VARIABLE)
    if not source or not (Path(source) / "backend" / "memory_management.py").is_file():
        pytest.skip(f"Forge's source is not here: set {FORGE_SOURCE_VARIABLE} to a Forge checkout (with "
                    "huggingface_guess/ beside backend/) to test on Forge's real model classes")
    pytest.importorskip("diffusers", reason="Forge's model code needs diffusers (the 'forge' environment has it)")
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip(f"Forge's model code needs transformers 4 (it pins 4.46.1); this is {transformers.__version__}")
    for folder in (source, str(Path(source) / "packages_3rdparty")):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    if "modules.shared" not in sys.modules:
        settings = types.SimpleNamespace(emphasis="Original", sdxl_crop_left=0, sdxl_crop_top=0)
        sys.modules["modules"] = types.ModuleType("modules")
        sys.modules["modules.shared"] = types.SimpleNamespace(opts=settings)
    import backend.args

    backend.args.args.always_cpu = not torch.cuda.is_available()


def tiny_forge_engine(family: str, tokenizer_folder: Path, seed: int = 0):
    """A Forge diffusion engine (`StableDiffusion`, `StableDiffusion2` or `StableDiffusionXL`) of tiny size,
    as `forge_model_reload` leaves it."""
    import_forge()
    from backend import memory_management
    from backend.diffusion_engine.sd15 import StableDiffusion
    from backend.diffusion_engine.sd20 import StableDiffusion2
    from backend.diffusion_engine.sdxl import StableDiffusionXL
    from diffusers import DDPMScheduler
    from huggingface_guess import model_list
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    unet_config = _unet_config(family)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_folder))
    prediction_type = "v_prediction" if family == "sd2" else "epsilon"
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    engine_class, guess, encoders = {
        "sd1": (StableDiffusion, model_list.SD15, {"text_encoder": "quick_gelu"}),
        "sd2": (StableDiffusion2, model_list.SD20, {"text_encoder": "gelu"}),
        "sdxl": (StableDiffusionXL, model_list.SDXL, {"text_encoder": "quick_gelu", "text_encoder_2": "gelu"}),
    }[family]
    with torch.inference_mode():  # as forge_model_reload()
        components = {"unet": _forge_unet(unet_config, memory_management), "vae": _forge_vae(memory_management),
                      "scheduler": scheduler}
        for name, activation in encoders.items():
            components[name] = _forge_clip(activation, memory_management)
            components[name.replace("text_encoder", "tokenizer")] = tokenizer
        engine = engine_class(guess(unet_config), components)
    engine.sd_checkpoint_info = types.SimpleNamespace(model_name=f"tiny-forge-{family}")
    return engine


def _unet_config(family: str) -> dict:
    config = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=(1, 2),
                  num_heads=2, num_head_channels=-1, use_spatial_transformer=True, transformer_depth=[1, 1],
                  transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=HIDDEN)
    if family == "sd2":
        config.update(use_linear_in_transformer=True)
    if family == "sdxl":
        config.update(use_linear_in_transformer=True, context_dim=2 * HIDDEN, num_classes="sequential",
                      adm_in_channels=HIDDEN + 6 * 256)
    return config


def _forge_unet(config: dict, memory_management) -> nn.Module:
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.operations import using_forge_operations

    device, dtype = memory_management.get_torch_device(), torch.float32
    with torch.inference_mode(False):
        weights = _perturbed(IntegratedUNet2DConditionModel.from_config(config).state_dict())
    with using_forge_operations(device=device, dtype=dtype, manual_cast_enabled=False):
        unet = IntegratedUNet2DConditionModel.from_config(config).to(device=device, dtype=dtype)
    unet.load_state_dict(weights)
    unet.storage_dtype = unet.computation_dtype = dtype
    unet.load_device = unet.initial_device = device
    unet.offload_device = memory_management.unet_offload_device()
    return unet


def _forge_clip(activation: str, memory_management) -> nn.Module:
    from backend.nn.clip import IntegratedCLIP
    from backend.operations import using_forge_operations
    from transformers import CLIPTextConfig, CLIPTextModel, modeling_utils

    config = CLIPTextConfig(hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                            projection_dim=HIDDEN, hidden_act=activation, bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=49407)
    with torch.inference_mode(False):
        weights = _perturbed(IntegratedCLIP(CLIPTextModel, config, add_text_projection=True).state_dict())
    with modeling_utils.no_init_weights(), using_forge_operations(device=torch.device("cpu"), dtype=torch.float32,
                                                                  manual_cast_enabled=True):
        clip = IntegratedCLIP(CLIPTextModel, config, add_text_projection=True)
    clip.load_state_dict(weights, strict=False)
    return clip


def _forge_vae(memory_management, **latent_format) -> nn.Module:
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.operations import using_forge_operations

    config = dict(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1)
    config.update(latent_format)
    with torch.inference_mode(False):
        weights = _perturbed(IntegratedAutoencoderKL.from_config(config).state_dict())
    with using_forge_operations(device=torch.device("cpu"), dtype=memory_management.vae_dtype()):
        vae = IntegratedAutoencoderKL.from_config(config)
    vae.load_state_dict(weights)
    return vae


def _perturbed(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Freshly initialised weights with every constant tensor (norm scales of 1, biases of 0) made slightly
    random: a text encoder whose output mean is exactly 0 makes the prompt-emphasis rescale divide by 0."""
    generator = torch.Generator().manual_seed(1)
    perturbed = {}
    for name, tensor in weights.items():
        if tensor.is_floating_point() and tensor.numel() > 1 and bool((tensor == tensor.flatten()[0]).all()):
            tensor = tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
        perturbed[name] = tensor.clone()
    return perturbed


FLUX_CONFIG = dict(image_model="flux", in_channels=16, vec_in_dim=HIDDEN, context_in_dim=HIDDEN, hidden_size=32,
                   mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000,
                   qkv_bias=True, guidance_embed=True)
"""A tiny Flux-dev transformer: the architecture of Forge's detection (16 latent channels, CLIP-L pooled vector,
T5 sequence, double and single stream blocks, guidance embedding) at a width of 32."""
T5_CONFIG = dict(num_layers=2, d_model=HIDDEN, d_ff=64, dense_act_fn="gelu_pytorch_tanh", is_gated_act=True,
                 num_heads=4, model_type="t5", vocab_size=64)
T5_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789,.()[]:"


def tiny_forge_flux_engine(tokenizer_folder: Path, seed: int = 0, gguf_file: Path | None = None,
                           schnell: bool = False):
    """Forge's `Flux` diffusion engine of tiny size (Flux-dev, with guidance; Flux-schnell without), as
    `forge_model_reload` leaves it: Forge's Flux transformer, its CLIP-L and T5 encoders and a 16-channel VAE with
    Flux's latent scale and shift. With `gguf_file`, the transformer is written there with its linear weights
    quantized to Q8_0 and loaded from it as Forge loads a .gguf checkpoint."""
    import_forge()
    from backend import memory_management
    from backend.diffusion_engine.flux import Flux
    from huggingface_guess import model_list
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    with torch.inference_mode():  # as forge_model_reload()
        config = FLUX_CONFIG | {"guidance_embed": not schnell}
        transformer = _forge_flux_transformer(config, memory_management, gguf_file)
        components = {"transformer": transformer,
                      "vae": _forge_vae(memory_management, latent_channels=16, scaling_factor=0.3611,
                                        shift_factor=0.1159),
                      "text_encoder": _forge_clip("quick_gelu", memory_management),
                      "text_encoder_2": _forge_t5(), "tokenizer": CLIPTokenizer.from_pretrained(str(tokenizer_folder)),
                      "tokenizer_2": t5_tokenizer()}
        engine = Flux((model_list.FluxSchnell if schnell else model_list.Flux)(config), components)
    engine.sd_checkpoint_info = types.SimpleNamespace(model_name="tiny-forge-flux")
    return engine


def t5_tokenizer():
    """A T5 tokenizer (sentencepiece-style unigram over single characters, T5's pad 0 and end 1) small enough for
    the tiny T5."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(character, -2.0) for character in T5_CHARACTERS]
    unigram = Tokenizer(models.Unigram(pieces, unk_id=2))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(tokenizer_object=unigram, extra_ids=0, pad_token="<pad>", eos_token="</s>",
                           unk_token="<unk>")


def _forge_flux_transformer(config: dict, memory_management, gguf_file: Path | None) -> nn.Module:
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.operations import using_forge_operations

    arguments = {key: value for key, value in config.items() if key != "image_model"}
    device, dtype = memory_management.get_torch_device(), torch.float32
    with torch.inference_mode(False):
        weights = _perturbed(IntegratedFluxTransformer2DModel(**arguments).state_dict())
    if gguf_file is None:
        with using_forge_operations(device=device, dtype=dtype, manual_cast_enabled=False):
            transformer = IntegratedFluxTransformer2DModel(**arguments).to(device=device, dtype=dtype)
        transformer.load_state_dict(weights)
        storage = dtype
    else:  # as Forge's loader reads a .gguf file (backend/loader.py)
        from backend.state_dict import load_state_dict
        from backend.utils import load_torch_file

        _write_q8_gguf(weights, gguf_file)
        with using_forge_operations(device=device, dtype=dtype, manual_cast_enabled=False, bnb_dtype="gguf"):
            transformer = IntegratedFluxTransformer2DModel(**arguments)
        load_state_dict(transformer, load_torch_file(str(gguf_file)))
        storage = "gguf"
    transformer.config = dict(config)
    transformer.storage_dtype, transformer.computation_dtype = storage, dtype
    transformer.load_device = transformer.initial_device = device
    transformer.offload_device = memory_management.unet_offload_device()
    return transformer


def _write_q8_gguf(weights: dict[str, torch.Tensor], path: Path) -> None:
    """A .gguf file of `weights`, the linear weights quantized to Q8_0 (blocks of 32 with a scale each), the rest
    kept in fp32, as city96's Flux gguf files are laid out."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "flux")
    for name, tensor in weights.items():
        array = tensor.numpy()
        if name.endswith(".weight") and array.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _forge_t5() -> nn.Module:
    from backend.nn.t5 import IntegratedT5
    from backend.operations import using_forge_operations

    with torch.inference_mode(False):
        weights = IntegratedT5(T5_CONFIG).state_dict()
    # Forge's T5LayerNorm starts from torch.empty (a checkpoint fills it): scales of about 1, as trained ones are.
    generator = torch.Generator().manual_seed(2)
    weights = {name: 1 + 0.05 * torch.randn(tensor.shape, generator=generator) if name.endswith("layer_norm.weight")
               else tensor for name, tensor in weights.items()}
    with using_forge_operations(device=torch.device("cpu"), dtype=torch.float32, manual_cast_enabled=True):
        t5 = IntegratedT5(T5_CONFIG)
    t5.load_state_dict(weights)
    return t5


def forge_trees(engine) -> dict[str, torch.nn.Module]:
    """The engine's LoRA-free model trees: its diffusion model, its text encoders and its VAE."""
    originals = engine.forge_objects_original
    return {"unet": originals.unet.model, "clip": originals.clip.cond_stage_model,
            "vae": originals.vae.first_stage_model}


def forge_state_hashes(engine) -> dict[str, str]:
    """A digest of every tensor of the engine's trees, by name."""
    return {f"{tree}.{name}": hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                                             .numpy()).hexdigest()
            for tree, module in forge_trees(engine).items() for name, tensor in module.state_dict().items()}


def forge_snapshot(engine) -> dict:
    """What training must leave as it was: weights (the same parameter objects), flags, modes, hooks, and the
    engine's choice of patchers and LoRA."""
    plain = (bool, int, float, str, tuple, type(None))
    modules = [(f"{tree}.{name}", module) for tree, root in forge_trees(engine).items()
               for name, module in root.named_modules()]
    return {
        "state": forge_state_hashes(engine),
        "parameters": [(name, id(parameter), parameter.requires_grad, parameter.is_inference())
                       for name, module in modules for parameter in module.parameters(recurse=False)],
        "training": [(name, module.training) for name, module in modules],
        "hooks": [(name, len(module._forward_hooks), len(module._forward_pre_hooks)) for name, module in modules],
        "attributes": [(name, sorted(vars(module)), {key: value for key, value in vars(module).items()
                                                     if isinstance(value, plain)}) for name, module in modules],
        "engine": (engine.current_lora_hash, id(engine.forge_objects.unet), id(engine.forge_objects.clip)),
    }


def forge_lora_patches(engine, path):
    """The file as Forge's Lora extension reads it: (UNet patches, CLIP patches, keys it could not place)."""
    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet

    originals = engine.forge_objects_original
    unet_keys = model_lora_keys_unet(originals.unet.model, {})
    clip_keys = model_lora_keys_clip(originals.clip.cond_stage_model, {})
    unet_patches, unmatched = load_lora(load_file(str(path)), unet_keys)
    clip_patches, unmatched = load_lora(unmatched, clip_keys)
    return unet_patches, clip_patches, unmatched


def prompt_with_loras(engine, loras: list) -> None:
    """What Forge does for a prompt with these `(file, strength)` LoRA tags: patched clones of its patchers
    (none without tags), merged into the weights when its memory manager loads them."""
    from backend import memory_management
    from fake_forge_host import apply_loras_as_forge

    apply_loras_as_forge(engine, loras)
    memory_management.load_models_gpu([engine.forge_objects.unet, engine.forge_objects.clip.patcher])


def predictions_with_the_file(engine, backend, path, latents: torch.Tensor, timesteps: torch.Tensor,
                              strengths: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The backend's prediction for one prompt with the LoRA file at `path` hooked at strength 1 by the trainer,
    without it, and after Forge merged the file at each of `strengths` (Forge's LoRA taken off afterwards)."""
    from lora_trainer.lora.targets import network_from_file
    from tests.measures import TINY_SIZES

    network = network_from_file(backend.lora_roots(), path)

    def prediction() -> torch.Tensor:
        with torch.no_grad():
            return backend.predict(latents, timesteps, backend.encode_text(["sks, a red shape"]), TINY_SIZES)

    with backend.training_mode(False), network.applied(1.0):
        hooked = prediction()
    with backend.training_mode(False):
        base = prediction()
    merged = []
    for strength in strengths:
        prompt_with_loras(engine, [(path, strength)])
        merged.append(prediction())
    prompt_with_loras(engine, [])
    return hooked, base, merged


def tiny_run_config(dataset: Path, output_dir: Path, **overrides):
    """A short run's config on the 32 px shapes dataset (rank 4, batch 2, 2 steps, no logs) with `overrides`."""
    from lora_trainer.config import config_from_dict

    settings = dict(train_data_dir=dataset, resolution=32, bucket_step=8, lora_rank=4, learning_rate=5e-3,
                    batch_size=2, max_train_steps=2, output_dir=output_dir, logging_dir=None, log_every_n_steps=1)
    return config_from_dict(settings | overrides)


def loss_without_and_with_the_file(backend, config, path: Path) -> tuple[float, float]:
    """`fixed_noise_loss` on the training images of `config` with the LoRA file at `path` at strength 0 and 1."""
    from lora_trainer.lora.targets import network_from_file
    from tests.measures import fixed_noise_loss

    network = network_from_file(backend.lora_roots(), path)
    with backend.training_mode(False):
        with network.applied(0.0):
            base_loss = fixed_noise_loss(backend, config)
        with network.applied(1.0):
            return base_loss, fixed_noise_loss(backend, config)
