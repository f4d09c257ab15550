"""The WebUI's Lora extension (A1111 v1.10.1, extensions-builtin/Lora), rewritten from its behaviour for the tests:
which layer a file's key names, how it merges a layer's delta into the weights, and the delta each module type
(network_lora, network_hada, network_lokr, with dora_scale) computes from a file's tensors."""

from __future__ import annotations

import re

import torch
from torch import nn


def webui_patched_tensors(layer: nn.Module) -> list[torch.Tensor]:
    if isinstance(layer, nn.MultiheadAttention):
        return [layer.in_proj_weight, layer.out_proj.weight, layer.out_proj.bias]
    return [layer.weight] + ([layer.bias] if layer.bias is not None else [])


def webui_apply(layer: nn.Module, deltas: list[torch.Tensor], name: tuple) -> None:
    """What the extension's patched forward does with a wanted LoRA: back the weights up once (to the CPU),
    restore them when the wanted set changed, and add the LoRA's delta in place."""
    is_attention = isinstance(layer, nn.MultiheadAttention)
    with torch.no_grad():
        if getattr(layer, "network_weights_backup", None) is None:
            bias = layer.out_proj.bias if is_attention else layer.bias
            layer.network_weights_backup = (layer.in_proj_weight.to("cpu", copy=True),
                                            layer.out_proj.weight.to("cpu", copy=True)) if is_attention \
                else layer.weight.to("cpu", copy=True)
            layer.network_bias_backup = None if bias is None else bias.to("cpu", copy=True)
        if getattr(layer, "network_current_names", ()) == (name,):
            return
        backups = list(layer.network_weights_backup) if is_attention else [layer.network_weights_backup]
        if layer.network_bias_backup is not None:
            backups.append(layer.network_bias_backup)
        for tensor, backup, delta in zip(webui_patched_tensors(layer), backups, deltas, strict=True):
            tensor.copy_(backup)
            tensor.add_(delta)
        layer.network_current_names = (name,)


def webui_layer_mapping(model: nn.Module) -> dict[str, nn.Module]:
    """Every module the extension can patch, under its name with `.` as `_`: the UNet as
    `diffusion_model_...`, text encoders as named under their `.wrapped` (SDXL: `0_...`, `1_...`)."""
    mapping: dict[str, nn.Module] = {}
    if model.is_sdxl:
        for index, embedder in enumerate(model.conditioner.embedders):
            if hasattr(embedder, "wrapped"):
                mapping.update({f"{index}_{name}".replace(".", "_"): module
                                for name, module in embedder.wrapped.named_modules()})
    else:
        text_encoder = getattr(model.cond_stage_model, "wrapped", model.cond_stage_model)
        mapping.update({name.replace(".", "_"): module for name, module in text_encoder.named_modules()})
    mapping.update({name.replace(".", "_"): module for name, module in model.model.named_modules()})
    return mapping


_RESNET_PARTS = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def webui_compvis_name(key: str, is_sd2: bool) -> str:
    """The extension's translation of diffusers-style kohya names (SD1/SD2 files) to its layer names; it
    assumes two resnets per level, as every SD UNet has."""
    if match := re.fullmatch(r"lora_unet_conv_in(.*)", key):
        return f"diffusion_model_input_blocks_0_0{match[1]}"
    if match := re.fullmatch(r"lora_unet_conv_out(.*)", key):
        return f"diffusion_model_out_2{match[1]}"
    if match := re.fullmatch(r"lora_unet_time_embedding_linear_(\d+)(.*)", key):
        return f"diffusion_model_time_embed_{2 * int(match[1]) - 2}{match[2]}"
    if match := re.fullmatch(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        level, index, part = int(match[2]), int(match[4]), match[5]
        position = 1 if match[3] == "attentions" else 0
        part = _RESNET_PARTS.get(part, part) if match[3] == "resnets" else part
        block = 1 + 3 * level + index if match[1] == "down" else 3 * level + index
        side = "input" if match[1] == "down" else "output"
        return f"diffusion_model_{side}_blocks_{block}_{position}_{part}"
    if match := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        part = _RESNET_PARTS.get(match[3], match[3]) if match[1] == "resnets" else match[3]
        block = 1 if match[1] == "attentions" else 2 * int(match[2])
        return f"diffusion_model_middle_block_{block}_{part}"
    if match := re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 * int(match[1]) + 3}_0_op"
    if match := re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        level = int(match[1])
        return f"diffusion_model_output_blocks_{3 * level + 2}_{1 if level == 0 else 2}_conv"
    if match := re.fullmatch(r"lora_te(2?)_text_model_encoder_layers_(\d+)_(.+)", key):
        if not (match[1] or is_sd2):
            return f"transformer_text_model_encoder_layers_{match[2]}_{match[3]}"
        part = match[3].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"{'1_' if match[1] else ''}model_transformer_resblocks_{match[2]}_{part}"
    return key


def webui_module_for(key: str, mapping: dict[str, nn.Module]) -> nn.Module | None:
    """The layer the extension patches with the file's weights under `key`, or None (an unmatched key)."""
    name = webui_compvis_name(key, is_sd2="model_transformer_resblocks" in mapping)
    module = mapping.get(name)
    if module is None and (match := re.fullmatch(r"(.*)_[qkv]_proj", name)):
        module = mapping.get(match[1])
    if module is None and "lora_unet" in key:
        module = mapping.get(key.replace("lora_unet", "diffusion_model"))
    elif module is None and "lora_te1_text_model" in key:
        module = mapping.get(key.replace("lora_te1_text_model", "0_transformer_text_model"))
        if module is None:
            module = mapping.get(key.replace("lora_te1_text_model", "transformer_text_model"))
    return module


def webui_updown(tensors: dict[str, torch.Tensor], original_weight: torch.Tensor, multiplier: float) -> torch.Tensor:
    """The change the extension merges into a layer's weight for one module of a file (`tensors` by suffix) at
    strength `multiplier`: the module type's product of factors, reshaped, times alpha / dim (1 without a dim),
    rescaled to `dora_scale` over the input columns when the file has one, times the strength.

    For an `nn.MultiheadAttention` part, `original_weight` is the whole `in_proj_weight`, as the extension
    passes it."""
    dim = None
    if "lora_down.weight" in tensors:
        up, down = tensors["lora_up.weight"], tensors["lora_down.weight"]
        dim = down.shape[0]
        shape = [up.shape[0], down.shape[1], *down.shape[2:]]
        updown = (up.reshape(up.shape[0], -1) @ down.reshape(dim, -1)).reshape(shape)
    elif "hada_w1_a" in tensors:
        w1a, w1b, w2a, w2b = (tensors[f"hada_w{i}_{ab}"] for i in (1, 2) for ab in "ab")
        dim = w1b.shape[0]
        shape = [w1a.shape[0], w1b.shape[1], *w1b.shape[2:]]
        updown = ((w1a @ w1b.reshape(dim, -1)) * (w2a @ w2b.reshape(dim, -1))).reshape(shape)
    else:
        w1 = tensors["lokr_w1"]
        if "lokr_w2" in tensors:
            w2 = tensors["lokr_w2"]
        else:
            w2 = tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
            dim = tensors["lokr_w2_b"].shape[0]
        shape = list(original_weight.shape) if original_weight.dim() == 4 else \
            [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        updown = torch.kron(w1, w2).reshape(shape)
    if updown.numel() == original_weight.numel():
        updown = updown.reshape(original_weight.shape)
    if dim is not None and "alpha" in tensors:
        updown = updown * (float(tensors["alpha"]) / dim)
    if "dora_scale" in tensors:
        merged = updown + original_weight
        columns = merged.transpose(0, 1).reshape(merged.shape[1], -1)
        norms = columns.norm(dim=1, keepdim=True).reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
        updown = merged * (tensors["dora_scale"] / norms) - original_weight
    return updown * multiplier
