"""A UNet's layout (channels per level, residual blocks, transformer depths), read from a diffusers config or an
original-layout (ldm/sgm, Forge) module tree, and a diffusion transformer's (Flux): what the memory estimate
counts activations from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class UNetLayout:
    """The UNet's shape as the activation count needs it (the same for diffusers and the original layout)."""

    level_channels: tuple[int, ...]
    """Channels of each resolution level, from the finest (SD: 320, 640, 1280, 1280)."""
    res_blocks: int
    """Residual blocks per level on the way down (the way up has one more)."""
    transformer_depth: tuple[int, ...]
    """Transformer blocks in each level's attention (0: none at that level)."""
    middle_depth: int
    """Transformer blocks in the middle block's attention."""
    context_dim: int
    """Width of the text conditioning the cross-attention reads."""
    linear_projection: bool
    """The attention's projections in and out are linear layers (SD2, SDXL), not 1x1 convolutions (SD1)."""


@dataclass(frozen=True)
class TransformerLayout:
    """A diffusion transformer's shape (Flux's double and single stream blocks) as the activation count needs it."""

    hidden_size: int
    double_blocks: int
    single_blocks: int
    text_tokens: int
    """Tokens of the text sequence that runs through the blocks beside the image's (Forge pads T5's to 256)."""
    patch_size: int
    """Latent cells per image token along each side."""


def layout_of_diffusers_unet(config: Any) -> UNetLayout:
    """The layout of a diffusers `UNet2DConditionModel` from its config."""
    levels = len(config["block_out_channels"])
    depth = config.get("transformer_layers_per_block", 1)
    depths = list(depth) if isinstance(depth, (list, tuple)) else [depth] * levels
    with_attention = ["CrossAttn" in kind for kind in config["down_block_types"]]
    middle = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    return UNetLayout(tuple(config["block_out_channels"]), config["layers_per_block"],
                      tuple(int(d) if attends else 0 for d, attends in zip(depths, with_attention)),
                      int(depths[-1]) if "CrossAttn" in middle else 0, config["cross_attention_dim"],
                      bool(config.get("use_linear_projection", False)))


def layout_of_original_unet(unet: nn.Module) -> UNetLayout:
    """The layout of an original-layout UNet, read from its `input_blocks` (a `Downsample` stage starts the next
    level) and `middle_block`."""
    level_channels: list[int] = []
    depths: list[int] = []
    level = 0
    for stage in list(unet.input_blocks)[1:]:
        kinds = [type(layer).__name__ for layer in stage]
        if "Downsample" in kinds:
            level += 1
            continue
        if len(level_channels) == level:
            level_channels.append(stage[kinds.index("ResBlock")].out_channels)
            depths.append(0)
        depths[level] = max(depths[level], _transformer_depth(stage))
    return UNetLayout(tuple(level_channels), int(unet.num_res_blocks[0]), tuple(depths),
                      _transformer_depth(unet.middle_block), _context_dim(unet),
                      any(getattr(layer, "use_linear", False) for layer in unet.modules()))


def _transformer_depth(stage: nn.Module) -> int:
    return sum(1 for layer in stage.modules() if type(layer).__name__ == "BasicTransformerBlock")


def _context_dim(unet: nn.Module) -> int:
    for layer in unet.modules():
        if type(layer).__name__ == "BasicTransformerBlock":
            return layer.attn2.to_k.weight.shape[1]
    return 0
