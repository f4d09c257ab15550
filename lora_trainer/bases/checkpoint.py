"""The learned bases as the single-file checkpoints the WebUI loads (original ldm/sgm key names).

`webui_checkpoint_state` is what a `.safetensors` checkpoint of the base holds; `write_webui_checkpoint` writes
the SD1 base with the sidecar `.yaml` that tells the WebUI its small architecture and a local folder with its
text encoder's config, so it loads offline: copy both files into `models/Stable-diffusion` and train on it in the
tab.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from lora_trainer.bases import (
    CLIP_FILE,
    OPEN_CLIP_FILE,
    VAE_FILE,
    VAE_SCALING_KEY,
    WEIGHTS_DIR,
    has_learned_base,
    load_text_encoder_state,
    unet_file,
)
from lora_trainer.files import atomic_write, atomic_write_text
from lora_trainer.models.original_checkpoint import (
    clip_to_open_clip,
    clip_to_transformers_original,
    unet_to_original,
    vae_to_original,
)
from lora_trainer.tiny import clip_tokenizer, text_encoder_config, write_clip_tokenizer_files


def vae_scaling_factor(folder: Path = WEIGHTS_DIR) -> float:
    """The latent scaling the learned VAE was given (1 / the latents' standard deviation)."""
    return float(load_file(str(Path(folder) / VAE_FILE))[VAE_SCALING_KEY])


def webui_checkpoint_state(family: str, folder: Path = WEIGHTS_DIR) -> dict[str, torch.Tensor]:
    """The learned base of `family` under the key names of an original SD1/SD2 (ldm) or SDXL (sgm) checkpoint."""
    if not has_learned_base(family, folder):
        raise FileNotFoundError(f"the learned {family} base is not in {folder}")
    folder = Path(folder)
    vae = {key: tensor for key, tensor in load_file(str(folder / VAE_FILE)).items() if key != VAE_SCALING_KEY}
    state = {f"model.diffusion_model.{key}": tensor
             for key, tensor in unet_to_original(load_file(str(folder / unet_file(family)))).items()}
    state |= {f"first_stage_model.{key}": tensor for key, tensor in vae_to_original(vae).items()}
    clip = load_file(str(folder / CLIP_FILE))
    open_clip = load_file(str(folder / OPEN_CLIP_FILE))
    if family == "sd1":
        text = {f"cond_stage_model.transformer.{key}": tensor
                for key, tensor in clip_to_transformers_original(clip).items()}
    elif family == "sd2":
        text = {f"cond_stage_model.model.{key}": tensor for key, tensor in clip_to_open_clip(open_clip).items()}
    else:
        text = {f"conditioner.embedders.0.transformer.{key}": tensor
                for key, tensor in clip_to_transformers_original(clip).items()}
        text |= {f"conditioner.embedders.1.model.{key}": tensor
                 for key, tensor in clip_to_open_clip(open_clip).items()}
    return state | text


def write_webui_checkpoint(out_folder: Path, name: str = "tiny-learned-sd1", folder: Path = WEIGHTS_DIR) -> Path:
    """Write the learned SD1 base as `name.safetensors` + `name.yaml` (+ `name-clip/`, its text encoder's
    config and tokenizer) into `out_folder`; returns the checkpoint's path."""
    out_folder = Path(out_folder).resolve()
    checkpoint = out_folder / f"{name}.safetensors"
    state = {key: tensor.contiguous() for key, tensor in webui_checkpoint_state("sd1", folder).items()}
    atomic_write(checkpoint, lambda tmp: save_file(state, str(tmp)))
    # ldm's FrozenCLIPEmbedder builds its encoder and tokenizer with `from_pretrained(version)`: a local folder
    # keeps that offline (the WebUI reads only its config; plain ldm its weights too).
    clip_folder = out_folder / f"{name}-clip"
    clip_tokenizer(clip_folder / "tokenizer-source").save_pretrained(clip_folder)
    write_clip_tokenizer_files(clip_folder)  # transformers 5 saves only tokenizer.json; the WebUI's 4.30 reads these
    encoder = CLIPTextModel(text_encoder_config())
    load_text_encoder_state(encoder, load_file(str(Path(folder) / CLIP_FILE)))
    encoder.save_pretrained(clip_folder)
    atomic_write_text(out_folder / f"{name}.yaml", _SD1_YAML.format(
        scale_factor=vae_scaling_factor(folder), clip_folder=json.dumps(str(clip_folder))))
    return checkpoint


_SD1_YAML = """\
# The learned tiny SD1 base of sd-webui-lora-trainer (lora_trainer/bases): 32 px images, 16x16x4 latents.
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 16
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: {scale_factor}
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 16
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [1]
        num_res_blocks: 2
        channel_mult: [1, 2]
        num_head_channels: 16
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 32
        use_checkpoint: True
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 32
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 2]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: {clip_folder}
"""
