"""Tiny bases that have learned to draw: the tiny architectures of `lora_trainer.tiny`, pretrained by
`lora_trainer.bases.pretrain` on the synthetic world of `lora_trainer.world`, weights committed beside this file.

One VAE serves every family (they share the latent shape); the text encoders stay as initialised (random and
frozen), which is enough for the world's few captions: SD1 and SDXL's first encoder share one CLIP, SD2 and
SDXL's second share one OpenCLIP-style encoder. Only the UNets differ per family.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from lora_trainer.lora.naming import hf_clip_path
from lora_trainer.tiny import tiny_sd_pipeline

WEIGHTS_DIR = Path(__file__).parent
FAMILIES = ("sd1", "sd2", "sdxl")
VAE_FILE = "vae.safetensors"
CLIP_FILE = "text-clip.safetensors"
OPEN_CLIP_FILE = "text-openclip.safetensors"
VAE_SCALING_KEY = "scaling_factor"
TEXT_ENCODER_SEEDS = {CLIP_FILE: 101, OPEN_CLIP_FILE: 102}


def unet_file(family: str) -> str:
    """The committed UNet weights of `family`."""
    return f"unet-{family}.safetensors"


def text_encoder_files(family: str) -> list[str]:
    """The committed text-encoder weights of `family`, in the pipeline's encoder order."""
    return {"sd1": [CLIP_FILE], "sd2": [OPEN_CLIP_FILE], "sdxl": [CLIP_FILE, OPEN_CLIP_FILE]}[family]


def has_learned_base(family: str, folder: Path = WEIGHTS_DIR, require_unet: bool = True) -> bool:
    """Whether the weights of `family`'s learned base are in `folder`."""
    names = [VAE_FILE, *text_encoder_files(family)] + ([unet_file(family)] if require_unet else [])
    return all((Path(folder) / name).is_file() for name in names)


def load_text_encoder_state(encoder: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `state` (keys with the `text_model.` level) into a transformers CLIP text model of any version."""
    own_keys = set(encoder.state_dict())
    mapped = {}
    for key, tensor in state.items():
        if key in own_keys:
            mapped[key] = tensor
        elif key.removeprefix("text_model.") in own_keys:
            mapped[key.removeprefix("text_model.")] = tensor
    missing = own_keys - set(mapped) - {key for key in own_keys if key.endswith("position_ids")}
    if missing:
        raise ValueError(f"text-encoder weights lack {sorted(missing)[:4]}")
    encoder.load_state_dict(mapped, strict=False)


def text_encoder_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`encoder`'s weights under version-independent keys (with the `text_model.` level)."""
    return {hf_clip_path(key): tensor for key, tensor in encoder.state_dict().items()
            if not key.endswith("position_ids")}


def learned_pipeline(family: str = "sd1", tokenizer_folder: Path | None = None, folder: Path = WEIGHTS_DIR,
                     require_unet: bool = True):
    """The learned tiny base of `family` as a diffusers pipeline (float32, on the CPU); with `require_unet`
    False (while pretraining it), a UNet not trained yet keeps its initial weights."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}")
    if not has_learned_base(family, folder, require_unet):
        raise FileNotFoundError(f"the learned {family} base is not in {folder}: run "
                                f"`python -m lora_trainer.bases.pretrain --family {family}`")
    folder = Path(folder)
    pipeline = tiny_sd_pipeline(family, seed=0, tokenizer_folder=tokenizer_folder)
    vae_state = load_file(str(folder / VAE_FILE))
    pipeline.vae.load_state_dict({key: tensor.float() for key, tensor in vae_state.items()
                                  if key != VAE_SCALING_KEY})
    pipeline.vae.register_to_config(scaling_factor=float(vae_state[VAE_SCALING_KEY]))
    if (folder / unet_file(family)).is_file():
        pipeline.unet.load_state_dict({key: tensor.float() for key, tensor in
                                       load_file(str(folder / unet_file(family))).items()})
    encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if family == "sdxl" else [])
    for encoder, name in zip(encoders, text_encoder_files(family)):
        load_text_encoder_state(encoder, {key: tensor.float() for key, tensor in load_file(str(folder / name)).items()})
    return pipeline


def save_learned_model(folder: Path, family: str = "sd1") -> Path:
    """Write the learned base of `family` as a diffusers folder (what `base_model` points at); kept if there."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        learned_pipeline(family, tokenizer_folder=folder / "tokenizer-source").save_pretrained(folder)
    return folder
