"""Choose the layers a run adapts, from the backend's module trees and the config."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lora_trainer.config import TrainConfig
from lora_trainer.errors import UserError
from lora_trainer.lora.files import read_lora
from lora_trainer.lora.naming import STEM_CONVS, kohya_key
from lora_trainer.lora.network import LoraNetwork, LoraTarget
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
        if root.not_trainable:
            raise UserError(root.not_trainable)
        suffixes = config.text_encoder_target_modules if root.is_text_encoder else config.target_modules
        found, linear_paths = [], []
        for path, layer in root.module.named_modules():
            weight = getattr(layer, "weight", None)
            if not isinstance(weight, nn.Parameter) or weight.dim() not in (2, 4):
                continue
            if weight.dim() == 2:
                linear_paths.append(path)
            if _matches(path, suffixes) and (weight.dim() == 2 or weight.shape[-2:] == (1, 1)):
                found.append(_target(root, path, layer, config.lora_rank, config.effective_lora_alpha))
            elif (not root.is_text_encoder and config.conv_rank and weight.dim() == 4
                  and weight.shape[-2:] == (3, 3) and path not in STEM_CONVS):
                found.append(_target(root, path, layer, config.conv_rank, config.effective_conv_alpha))
        if not found and suffixes:
            raise UserError(f"no layer of {root.prefix} matches {suffixes}; layer names look like: "
                            + ", ".join(linear_paths[:8]))
        targets += found
    return targets


def _target(root: LoraRoot, path: str, layer: nn.Module, rank: int, alpha: float) -> LoraTarget:
    return LoraTarget(*_keys(root, path), layer, rank, alpha)


def _keys(root: LoraRoot, path: str) -> tuple[str, str]:
    """The kohya key and the diffusers/peft key of the layer at `path` in `root`."""
    return kohya_key(root.prefix, root.kohya_path(path)), f"{root.peft_prefix}.{root.peft_path(path)}"


def _matches(path: str, suffixes: list[str]) -> bool:
    return any(path == suffix or path.endswith("." + suffix) for suffix in suffixes)


def network_from_file(roots: list[LoraRoot], path: Path) -> LoraNetwork:
    """A `LoraNetwork` on the layers of `roots` that the LoRA file at `path` has weights for, loaded.

    Every layer of the file must exist in the model: a file for another model family is an error that
    names the layers it could not place.
    """
    layers = {}
    for root in roots:
        for module_path, layer in root.module.named_modules():
            weight = getattr(layer, "weight", None)
            if isinstance(weight, nn.Parameter) and weight.dim() in (2, 4):
                key, peft_key = _keys(root, module_path)
                layers[key] = (peft_key, layer)
    lora = read_lora(path, {peft_key: key for key, (peft_key, _) in layers.items()})
    unplaced = sorted(lora.module_keys - layers.keys())
    if unplaced:
        raise UserError(f"{path}: {len(unplaced)} of its {len(lora.module_keys)} layers do not exist in this model "
                        f"(e.g. {unplaced[0]}); is it a LoRA for another model family?")
    targets = [LoraTarget(key, layers[key][0], layers[key][1], lora.rank_of(key),
                          float(lora.state.get(f"{key}.alpha", lora.rank_of(key))))
               for key in sorted(lora.module_keys)]
    network = LoraNetwork(targets)
    network.load_kohya_state_dict(lora.state)
    return network
