"""Kohya key names, derived from module paths in this one place.

A kohya key is `<prefix>_<module path with dots as underscores>`. The UNet part uses diffusers block
names for SD1/SD2 files and the original (compvis) block names for SDXL files, as kohya's sd-scripts
and the WebUI's Lora extension expect; backends whose modules carry the other naming are converted here.
"""

from __future__ import annotations

import re

UNET_PREFIX = "lora_unet"

_RESNET_DIFFUSERS_TO_COMPVIS = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_RESNET_COMPVIS_TO_DIFFUSERS = {v: k for k, v in _RESNET_DIFFUSERS_TO_COMPVIS.items()}
_TOP_LEVEL_DIFFUSERS_TO_COMPVIS = {
    "conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}
_TOP_LEVEL_COMPVIS_TO_DIFFUSERS = {v: k for k, v in _TOP_LEVEL_DIFFUSERS_TO_COMPVIS.items()}


def kohya_key(prefix: str, module_path: str) -> str:
    """`lora_unet` + `down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def hf_clip_path(module_path: str) -> str:
    """A transformers CLIP text-model path with the `text_model.` level that kohya names carry.

    transformers 5 dropped that level from `CLIPTextModel`; older versions and the WebUI have it.
    """
    return module_path if module_path.startswith("text_model.") else f"text_model.{module_path}"


def unet_diffusers_to_compvis(path: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """Translate a diffusers UNet module path to the original (ldm/sgm) path of the same module."""
    for diffusers_name, compvis_name in _TOP_LEVEL_DIFFUSERS_TO_COMPVIS.items():
        if path == diffusers_name or path.startswith(diffusers_name + "."):
            return compvis_name + path[len(diffusers_name):]
    per_level = layers_per_block + 1
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)(\..+)?", path):
        level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4] or ""
        block = level * per_level + index + 1
        return _inner(f"input_blocks.{block}", kind, rest)
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(\..+)?", path):
        return f"input_blocks.{(int(match[1]) + 1) * per_level}.0.op{match[2] or ''}"
    if match := re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)(\..+)?", path):
        kind, index, rest = match[1], int(match[2]), match[3] or ""
        block = 1 if kind == "attentions" else 2 * index
        return _inner(f"middle_block.{block}", kind, rest, nested=False)
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)(\..+)?", path):
        level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4] or ""
        return _inner(f"output_blocks.{level * per_level + index}", kind, rest)
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(\..+)?", path):
        level = int(match[1])
        position = 2 if level in up_blocks_with_attention else 1
        return f"output_blocks.{level * per_level + layers_per_block}.{position}.conv{match[2] or ''}"
    raise ValueError(f"no original-UNet name for diffusers module {path!r}")


def unet_compvis_to_diffusers(path: str, layers_per_block: int) -> str:
    """Translate an original (ldm/sgm) UNet module path to the diffusers path of the same module."""
    for compvis_name, diffusers_name in _TOP_LEVEL_COMPVIS_TO_DIFFUSERS.items():
        if path == compvis_name or path.startswith(compvis_name + "."):
            return diffusers_name + path[len(compvis_name):]
    per_level = layers_per_block + 1
    if match := re.fullmatch(r"input_blocks\.(\d+)\.0\.op(\..+)?", path):
        return f"down_blocks.{int(match[1]) // per_level - 1}.downsamplers.0.conv{match[2] or ''}"
    if match := re.fullmatch(r"input_blocks\.(\d+)\.([01])(\..+)?", path):
        level, index = divmod(int(match[1]) - 1, per_level)
        return _outer(f"down_blocks.{level}", match[2], index, match[3] or "")
    if match := re.fullmatch(r"middle_block\.(\d+)(\..+)?", path):
        block, rest = int(match[1]), match[2] or ""
        if block == 1:
            return f"mid_block.attentions.0{rest}"
        return f"mid_block.resnets.{block // 2}{_resnet_part(rest, _RESNET_COMPVIS_TO_DIFFUSERS)}"
    if match := re.fullmatch(r"output_blocks\.(\d+)\.([12])\.conv(\..+)?", path):
        return f"up_blocks.{int(match[1]) // per_level}.upsamplers.0.conv{match[3] or ''}"
    if match := re.fullmatch(r"output_blocks\.(\d+)\.([01])(\..+)?", path):
        level, index = divmod(int(match[1]), per_level)
        return _outer(f"up_blocks.{level}", match[2], index, match[3] or "")
    raise ValueError(f"no diffusers name for original-UNet module {path!r}")


def _inner(block: str, kind: str, rest: str, nested: bool = True) -> str:
    if kind == "attentions":
        return f"{block}.1{rest}" if nested else f"{block}{rest}"
    resnet = f"{block}.0" if nested else block
    return resnet + _resnet_part(rest, _RESNET_DIFFUSERS_TO_COMPVIS)


def _outer(block: str, position: str, index: int, rest: str) -> str:
    if position == "1":
        return f"{block}.attentions.{index}{rest}"
    return f"{block}.resnets.{index}{_resnet_part(rest, _RESNET_COMPVIS_TO_DIFFUSERS)}"


def _resnet_part(rest: str, table: dict[str, str]) -> str:
    inner = rest[1:]
    for source, target in table.items():
        if inner == source or inner.startswith(source + "."):
            return f".{target}{inner[len(source):]}"
    return rest
