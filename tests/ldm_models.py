"""Tiny model objects shaped like the ones the AUTOMATIC1111 WebUI loads, built offline from the real `ldm` classes.

SD1 and SD2 are real `ldm.models.diffusion.ddpm.LatentDiffusion` objects (ldm UNet, KL autoencoder, CLIP or
OpenCLIP text encoder), with the text encoder under a `.wrapped` attribute as the WebUI's prompt-parsing
hijack leaves it. SDXL needs sgm, which is not installable here: `TinySDXL` stands in for sgm's
`DiffusionEngine` with the attributes the WebUI adds to it, around an SDXL-shaped ldm UNet (linear
projections, no attention at the top level, a `label_emb` for the 2816-style vector), a CLIP encoder and an
OpenCLIP encoder shaped like sgm's `FrozenOpenCLIPEmbedder2`.
"""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from pathlib import Path

import open_clip
import torch
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import make_beta_schedule, timestep_embedding
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.util import instantiate_from_config
from omegaconf import OmegaConf
from torch import nn

from lora_trainer.bases import WEIGHTS_DIR
from lora_trainer.bases.checkpoint import vae_scaling_factor, webui_checkpoint_state
from lora_trainer.tiny import SIZE_EMBEDDING_DIM, TEXT_WIDTH, clip_tokenizer, text_encoder_config

TINY_OPEN_CLIP = "lt-test-tiny-openclip-text"


def tiny_sd1(folder: Path, seed: int = 0) -> nn.Module:
    """An SD1-shaped `LatentDiffusion` (eps, CLIP text encoder, conv projections in the transformers)."""
    torch.manual_seed(seed)
    model = instantiate_from_config(_latent_diffusion_config(
        parameterization="eps", use_linear=False,
        cond_stage={"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                    "params": {"version": str(_clip_text_folder(folder, "clip-l", seed)), "device": "cpu"}}))
    return _as_loaded_by_webui(model, "sd1", seed)


def tiny_sd2(folder: Path, seed: int = 0) -> nn.Module:
    """An SD2-768-v-shaped `LatentDiffusion` (v-prediction, OpenCLIP text encoder, linear projections)."""
    torch.manual_seed(seed)
    _register_tiny_open_clip(folder)
    model = instantiate_from_config(_latent_diffusion_config(
        parameterization="v", use_linear=True,
        cond_stage={"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                    "params": {"arch": TINY_OPEN_CLIP, "version": None, "device": "cpu",
                               "layer": "penultimate"}}))
    return _as_loaded_by_webui(model, "sd2", seed)


def tiny_sdxl(folder: Path, seed: int = 0) -> nn.Module:
    """An SDXL-shaped model object (see `TinySDXL`), in eval mode like a loaded checkpoint."""
    torch.manual_seed(seed)
    clip_l = FrozenCLIPEmbedder(str(_clip_text_folder(folder, "clip-l", seed)), device="cpu", layer="hidden",
                                layer_idx=-2)
    _register_tiny_open_clip(folder)
    big_g = FrozenOpenCLIPEmbedder2(TINY_OPEN_CLIP)
    conditioner = Conditioner([
        WebUITextEncoder(clip_l), WebUITextEncoder(big_g, return_pooled=True),
        SizeEmbedder("original_size_as_tuple"), SizeEmbedder("crop_coords_top_left"),
        SizeEmbedder("target_size_as_tuple")])
    pooled_width = TEXT_WIDTH
    unet = UNetModel(image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
                     num_res_blocks=2, channel_mult=[1, 2], num_head_channels=16, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=2 * TEXT_WIDTH, use_linear_in_transformer=True, legacy=False,
                     use_checkpoint=True)
    # sgm's UNet takes the vector through `label_emb` (num_classes="sequential", adm_in_channels); ldm's has
    # the same forward once given that layer.
    time_embed_dim = unet.time_embed[0].out_features
    unet.num_classes = "sequential"
    unet.label_emb = nn.Sequential(nn.Sequential(
        nn.Linear(pooled_width + 6 * SIZE_EMBEDDING_DIM, time_embed_dim), nn.SiLU(),
        nn.Linear(time_embed_dim, time_embed_dim)))
    first_stage = instantiate_from_config(_autoencoder_config())
    model = TinySDXL(unet, conditioner, first_stage)
    perturb_constant_parameters(model, seed)
    return model.eval()


class WebUITextEncoder(nn.Module):
    """Stands in for the WebUI's prompt-parsing wrapper (`FrozenCLIPEmbedderWithCustomWords` and kin): the
    ldm/sgm encoder sits under `.wrapped`, which is where the WebUI's LoRA key mapping looks."""

    def __init__(self, wrapped: nn.Module, return_pooled: bool = False):
        super().__init__()
        self.wrapped = wrapped
        self.return_pooled = return_pooled
        self.is_trainable = False
        self.input_key = "txt"

    def forward(self, texts: list[str]):
        if not self.return_pooled:
            return self.wrapped(texts)
        outputs = self.wrapped(texts)
        return outputs[self.wrapped.layer], outputs["pooled"]


class FrozenOpenCLIPEmbedder2(nn.Module):
    """sgm's `FrozenOpenCLIPEmbedder2` as SDXL configures it (layer "penultimate", legacy False): the
    penultimate layer's hidden states, and the last layer's end-of-text state, normed and projected."""

    def __init__(self, arch: str):
        super().__init__()
        model = open_clip.create_model(arch, device="cpu", pretrained=None)
        del model.visual
        self.model = model
        self.layer = "penultimate"
        self.device = "cpu"

    def forward(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.encode_with_transformer(open_clip.tokenize(texts).to(self.device))

    def encode_with_transformer(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (self.model.token_embedding(tokens) + self.model.positional_embedding).permute(1, 0, 2)  # NLD -> LND
        outputs = {}
        blocks = self.model.transformer.resblocks
        for index, block in enumerate(blocks):
            if index == len(blocks) - 1:
                outputs["penultimate"] = x.permute(1, 0, 2)
            x = block(x, attn_mask=self.model.attn_mask)
        last = self.model.ln_final(x.permute(1, 0, 2))
        outputs["pooled"] = last[torch.arange(last.shape[0]), tokens.argmax(dim=-1)] @ self.model.text_projection
        return outputs


class SizeEmbedder(nn.Module):
    """sgm's `ConcatTimestepEmbedderND(outdim=256)`: each number as a sinusoidal embedding, concatenated."""

    def __init__(self, input_key: str):
        super().__init__()
        self.input_key = input_key
        self.is_trainable = False

    def forward(self, numbers: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(numbers.flatten(), SIZE_EMBEDDING_DIM).reshape(numbers.shape[0], -1)


class Conditioner(nn.Module):
    """sgm's `GeneralConditioner`: runs every embedder (under no_grad unless it is trainable) and
    concatenates the outputs by rank: 3-D into "crossattn", 2-D into "vector"."""

    def __init__(self, embedders: list[nn.Module]):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        output: dict[str, torch.Tensor] = {}
        for embedder in self.embedders:
            with nullcontext() if embedder.is_trainable else torch.no_grad():
                embedded = embedder(batch[embedder.input_key])
            for tensor in embedded if isinstance(embedded, tuple) else (embedded,):
                key, dim = ("crossattn", 2) if tensor.dim() == 3 else ("vector", 1)
                output[key] = torch.cat((output[key], tensor), dim) if key in output else tensor
        return output


class OpenAIWrapper(nn.Module):
    """sgm's `OpenAIWrapper`: the UNet under `.diffusion_model`, called with the conditioning dict."""

    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.diffusion_model(x, timesteps=t, context=c["crossattn"], y=c["vector"])


class TinySDXL(nn.Module):
    """sgm's `DiffusionEngine` as the WebUI presents it (`sd_models_xl.extend_sdxl` and friends)."""

    is_sdxl = True
    is_sd2 = False
    is_sd1 = False
    parameterization = "eps"
    scale_factor = 0.13025

    def __init__(self, unet: nn.Module, conditioner: Conditioner, first_stage_model: nn.Module):
        super().__init__()
        self.model = OpenAIWrapper(unet)
        self.conditioner = conditioner
        self.first_stage_model = first_stage_model
        betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
        self.alphas_cumprod = torch.tensor(betas).neg().add(1).cumprod(0).float()

    def get_learned_conditioning(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Like the WebUI's: the default 1024x1024 size conditioning, crop at 0,0."""
        sizes = torch.tensor([1024.0, 1024.0]).repeat(len(texts), 1)
        return self.conditioner({"txt": texts, "original_size_as_tuple": sizes,
                                 "crop_coords_top_left": torch.zeros_like(sizes), "target_size_as_tuple": sizes})

    def encode_first_stage(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.scale_factor * self.first_stage_model.encode(pixels).sample()

    def get_first_stage_encoding(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def decode_first_stage(self, latents: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(latents / self.scale_factor)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(x, t, cond)


def perturb_constant_parameters(model: nn.Module, seed: int, scale: float = 0.1) -> None:
    """Add noise to every parameter whose values are all equal (zero-initialised output layers, fresh norms),
    so that random-weight outputs depend on their inputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() > 1 and bool((parameter == parameter.flatten()[0]).all()):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def _as_loaded_by_webui(model: nn.Module, family: str, seed: int) -> nn.Module:
    model.cond_stage_model = WebUITextEncoder(model.cond_stage_model)
    model.is_sd1, model.is_sd2, model.is_sdxl = family == "sd1", family == "sd2", False
    perturb_constant_parameters(model, seed)
    return model.eval()


def _latent_diffusion_config(parameterization: str, use_linear: bool, cond_stage: dict):
    unet = {"image_size": 16, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "attention_resolutions": [1], "num_res_blocks": 2, "channel_mult": [1, 2], "num_head_channels": 16,
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": TEXT_WIDTH,
            "use_linear_in_transformer": use_linear, "legacy": False, "use_checkpoint": True}
    return OmegaConf.create({
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "first_stage_key": "jpg",
            "cond_stage_key": "txt", "image_size": 16, "channels": 4, "cond_stage_trainable": False,
            "conditioning_key": "crossattn", "scale_factor": 0.18215, "use_ema": False, "monitor": None,
            "parameterization": parameterization,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
            "first_stage_config": _autoencoder_config(),
            "cond_stage_config": cond_stage,
        }})


def _autoencoder_config() -> dict:
    """A KL autoencoder that downsamples 2x (32 px images, 16x16 latents)."""
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    return OmegaConf.create({"target": "ldm.models.autoencoder.AutoencoderKL",
                             "params": {"embed_dim": 4, "ddconfig": ddconfig,
                                        "lossconfig": {"target": "torch.nn.Identity"}}})


def _clip_text_folder(folder: Path, name: str, seed: int) -> Path:
    """A saved tiny CLIP text model with the real tokenizer, for `from_pretrained` (no download)."""
    from transformers import CLIPTextModel

    target = Path(folder) / name
    if not (target / "config.json").is_file():
        torch.manual_seed(seed)
        clip_tokenizer(Path(folder) / "tokenizer-source").save_pretrained(target)
        CLIPTextModel(text_encoder_config(hidden_size=TEXT_WIDTH)).save_pretrained(target)
    return target


def _register_tiny_open_clip(folder: Path) -> None:
    """Make a tiny OpenCLIP architecture known by name (its 77-token text tower is what SD2 uses)."""
    config = {"embed_dim": TEXT_WIDTH,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": 2, "layers": 2}}
    path = Path(folder) / f"{TINY_OPEN_CLIP}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)


def learned_ldm_model(family: str, folder: Path, weights: Path = WEIGHTS_DIR) -> nn.Module:
    """The learned tiny base of `family` (lora_trainer/bases) as the WebUI would load its single-file checkpoint."""

    Path(folder).mkdir(parents=True, exist_ok=True)
    model = {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}[family](folder)
    own_keys = set(model.state_dict())
    state = {}
    for key, tensor in webui_checkpoint_state(family, weights).items():
        # The WebUI wraps each text encoder after loading the checkpoint; these objects come wrapped already.
        wrapped = re.sub(r"^(cond_stage_model|conditioner\.embedders\.\d+)\.", r"\1.wrapped.", key)
        state[wrapped if wrapped in own_keys else key] = tensor.float()
    unexpected = set(state) - own_keys
    missing = own_keys - set(state) - {name for name, _ in model.named_buffers()} - {
        key for key in own_keys if key.endswith("logit_scale")}
    if unexpected or missing:
        raise AssertionError(f"checkpoint and model differ: unexpected {sorted(unexpected)[:5]}, "
                             f"missing {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)
    model.scale_factor = vae_scaling_factor(weights)
    return model.eval()
