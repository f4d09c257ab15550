"""Choose the layers a run adapts, from the backend's module trees and the config."""

from __future__ import annotations

from torch import nn

from lora_trainer.config import TrainConfig
from lora_trainer.errors import UserError
from lora_trainer.lora.naming import STEM_CONVS, kohya_key
from lora_trainer.lora.network import LoraTarget
from lora_trainer.models.base import LoraRoot


def find_lora_targets(roots: list[LoraRoot], config: TrainConfig) -> list[LoraTarget]:
    """Every layer of `roots` that the config asks to adapt, with its kohya key, rank and alpha.

    A layer matches a name in `target_modules` (or `text_encoder_target_modules`) when its path ends with
    it. With `conv_rank > 0`, the UNet's 3x3 convolutions (except the stem's) are adapted too.
    """
    targets: list[LoraTarget] = []
    for root in roots:
        if root.is_text_encoder and not config.train_text_encoder:
            continue
        suffixes = config.text_encoder_target_modules if root.is_text_encoder else config.target_modules
        found = []
        for path, layer in root.module.named_modules():
            weight = getattr(layer, "weight", None)
            if not isinstance(weight, nn.Parameter) or weight.dim() not in (2, 4):
                continue
            if _matches(path, suffixes) and (weight.dim() == 2 or weight.shape[-2:] == (1, 1)):
                found.append(_target(root, path, layer, config.lora_rank, config.effective_lora_alpha))
            elif (not root.is_text_encoder and config.conv_rank and weight.dim() == 4
                  and weight.shape[-2:] == (3, 3) and path not in STEM_CONVS):
                found.append(_target(root, path, layer, config.conv_rank, config.effective_conv_alpha))
        if not found and suffixes:
            examples = [path for path, layer in root.module.named_modules()
                        if getattr(getattr(layer, "weight", None), "dim", lambda: 0)() == 2][:8]
            raise UserError(f"no layer of {root.prefix} matches {suffixes}; layer names look like: "
                            + ", ".join(examples))
        targets += found
    return targets


def _target(root: LoraRoot, path: str, layer: nn.Module, rank: int, alpha: float) -> LoraTarget:
    return LoraTarget(kohya_key(root.prefix, root.kohya_path(path)), f"{root.peft_prefix}.{root.peft_path(path)}",
                      layer, rank, alpha)


def _matches(path: str, suffixes: list[str]) -> bool:
    return any(path == suffix or path.endswith("." + suffix) for suffix in suffixes)
