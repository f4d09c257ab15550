"""Diffusers-layout weights under the original (ldm/sgm) single-file key names: what the WebUI loads.

Pure key and layout conversion of state dicts (no diffusers import), so the WebUI's own environment can use it.
"""

from __future__ import annotations

import re

import torch

from lora_trainer.lora.naming import hf_clip_path, unet_diffusers_to_compvis

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def unet_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict under the original names, without the `model.diffusion_model.` prefix."""
    layers_per_block = 1 + max(int(match[1]) for key in state
                               if (match := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", key)))
    with_attention = {int(match[1]) for key in state if (match := re.match(r"up_blocks\.(\d+)\.attentions\.", key))}
    converted = {}
    for key, tensor in state.items():
        module, _, parameter = key.rpartition(".")
        converted[f"{unet_diffusers_to_compvis(module, layers_per_block, with_attention)}.{parameter}"] = tensor
    return converted


def vae_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers `AutoencoderKL` state dict under ldm's names (mid-block attention as 1x1 convolutions)."""
    levels = 1 + max(int(match[1]) for key in state if (match := re.match(r"encoder\.down_blocks\.(\d+)\.", key)))
    converted = {}
    for key, tensor in state.items():
        name, is_attention = _vae_key(key, levels)
        converted[name] = tensor[..., None, None] if is_attention and tensor.dim() == 2 else tensor
    return converted


def clip_to_transformers_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's state under the names ldm's `FrozenCLIPEmbedder.transformer` has."""
    return {hf_clip_path(key): tensor for key, tensor in state.items()
            if not key.endswith("position_ids") and "text_projection" not in key}


def clip_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model (with projection) as an OpenCLIP text tower: fused q/k/v, `ln_final`,
    the projection as a matrix the hidden state is multiplied by."""
    state = {hf_clip_path(key).removeprefix("text_model."): tensor for key, tensor in state.items()}
    converted = {"token_embedding.weight": state["embeddings.token_embedding.weight"],
                 "positional_embedding": state["embeddings.position_embedding.weight"],
                 "ln_final.weight": state["final_layer_norm.weight"], "ln_final.bias": state["final_layer_norm.bias"]}
    if "text_projection.weight" in state:
        converted["text_projection"] = state["text_projection.weight"].t().contiguous()
    layers = {int(match[1]) for key in state if (match := re.match(r"encoder\.layers\.(\d+)\.", key))}
    for index in sorted(layers):
        source, target = f"encoder.layers.{index}", f"transformer.resblocks.{index}"
        for part in ("weight", "bias"):
            converted[f"{target}.attn.in_proj_{part}"] = torch.cat(
                [state[f"{source}.self_attn.{projection}_proj.{part}"] for projection in ("q", "k", "v")])
            for hf_name, open_clip_name in _OPEN_CLIP_LAYER.items():
                converted[f"{target}.{open_clip_name}.{part}"] = state[f"{source}.{hf_name}.{part}"]
    return converted


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
