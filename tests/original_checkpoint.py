"""Write a diffusers SD1 pipeline as an original-layout single-file checkpoint (what users download).

Test-only: it lets the tests load a real `.safetensors` single file through `from_single_file` offline.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_trainer.lora.naming import hf_clip_path, unet_diffusers_to_compvis

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def save_original_checkpoint(pipeline, path: Path) -> Path:
    """Save `pipeline`'s UNet, VAE and text encoder under the original (ldm) key names."""
    unet = pipeline.unet
    with_attention = {index for index, block in enumerate(unet.up_blocks) if hasattr(block, "attentions")}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in unet.state_dict().items():
        module, _, parameter = key.rpartition(".")
        original = unet_diffusers_to_compvis(module, unet.config.layers_per_block, with_attention)
        state[f"model.diffusion_model.{original}.{parameter}"] = tensor
    levels = len(pipeline.vae.config.block_out_channels)
    for key, tensor in pipeline.vae.state_dict().items():
        name, is_attention = _vae_key(key, levels)
        state[f"first_stage_model.{name}"] = tensor[..., None, None] if is_attention and tensor.dim() == 2 else tensor
    for key, tensor in pipeline.text_encoder.state_dict().items():
        state[f"cond_stage_model.transformer.{hf_clip_path(key)}"] = tensor
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path


def _vae_key(key: str, levels: int) -> tuple[str, bool]:
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{match[1]}.mid.attn_1.{_VAE_ATTENTION[match[2]]}.{match[3]}", True
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{_resnet(match[3])}", False
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{_resnet(match[3])}", False
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}", False
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(match[1])}.block.{match[2]}.{_resnet(match[3])}", False
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(match[1])}.upsample.conv.{match[2]}", False
    return key.replace("conv_norm_out", "norm_out"), False


def _resnet(rest: str) -> str:
    part, _, parameter = rest.rpartition(".")
    return f"{_VAE_RESNET.get(part, part)}.{parameter}"
