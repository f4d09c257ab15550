"""Choose the layers a run adapts, from the backend's module trees and the config."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lora_trainer.config import NetworkConfig
from lora_trainer.errors import UserError
from lora_trainer.lora.files import read_lora
from lora_trainer.lora.naming import kohya_key
from lora_trainer.lora.network import LoraNetwork, LoraTarget
from lora_trainer.lora.network_types import ATTENTION_PARTS, attention_part_weight, module_from_file
from lora_trainer.models.base import LoraRoot

CONV_BLOCKS = frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D", "ResBlock", "Downsample", "Upsample"})
"""The UNet blocks (diffusers' and ldm/sgm/Forge's class names) whose layers a conv rank adapts, as kohya's
LoCon does: their 3x3 convolutions at the conv rank, their linear and 1x1 layers (`time_emb_proj`,
`conv_shortcut`) at the LoRA rank."""
_ENCODER_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


def find_lora_targets(roots: list[LoraRoot], network: NetworkConfig) -> list[LoraTarget]:
    """Every layer of `roots` that the network config asks to adapt, with its kohya key, rank, alpha and type.

    A layer matches a name in `target_modules` (or `text_encoder_target_modules`) when its path, or its
    path as kohya files name it, ends with it. With a conv rank (by default for locon, loha and lokr), the
    layers of the UNet's resnets and samplers are adapted too (`CONV_BLOCKS`). Text-encoder layers whose output
    never reaches the conditioning are left out.
    """
    targets: list[LoraTarget] = []
    for root in roots:
        if root.is_text_encoder and not network.train_text_encoder:
            continue
        suffixes = network.text_encoder_target_modules if root.is_text_encoder else network.target_modules
        in_conv_blocks = _paths_under(root.module, CONV_BLOCKS) if network.effective_conv_rank else set()
        found, linear_paths = [], []
        for path, layer, part, weight in _adaptable_layers(root.module):
            if weight.dim() == 2:
                linear_paths.append(path)
            is_linear_or_1x1 = weight.dim() == 2 or weight.shape[-2:] == (1, 1)
            if not _runs(root, path):
                continue
            targeted = matches_targets((path, root.kohya_path(path)), suffixes)
            if is_linear_or_1x1 and (targeted or path in in_conv_blocks):
                found.append(_target(root, path, layer, part, network, network.lora_rank,
                                     network.effective_lora_alpha))
            elif path in in_conv_blocks and weight.shape[-2:] == (3, 3):
                found.append(_target(root, path, layer, part, network, network.effective_conv_rank,
                                     network.effective_conv_alpha))
        if not found and suffixes:
            raise UserError(f"no layer of {root.prefix} matches {suffixes}; layer names look like: "
                            + ", ".join(linear_paths[:8]))
        targets += found
    return targets


def never_run_keys(roots: list[LoraRoot]) -> set[str]:
    """The kohya keys of the text-encoder layers whose output never reaches the conditioning (those after the
    layer the model conditions on), which a run neither adapts nor reads from a file."""
    return {_keys(root, path)[0] for root in roots for path, _, _, _ in _adaptable_layers(root.module)
            if not _runs(root, path)}


def _runs(root: LoraRoot, path: str) -> bool:
    """Whether the layer at `path` of `root` contributes to the model's output."""
    if root.text_layers_used is None:
        return True
    layer_index = _ENCODER_LAYER.search(root.kohya_path(path))
    return layer_index is None or int(layer_index.group(1)) < root.text_layers_used


def _paths_under(module: nn.Module, class_names: frozenset[str]) -> set[str]:
    """The paths of every module inside a module whose class is one of `class_names`."""
    blocks = tuple(f"{path}." for path, child in module.named_modules() if type(child).__name__ in class_names)
    return {path for path, _ in module.named_modules() if blocks and path.startswith(blocks)}


def _adaptable_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module, str | None, torch.Tensor]]:
    """(path, layer, attention part, weight) of every linear or convolution layer under `module`.

    An `nn.MultiheadAttention` counts as four layers, `<path>.q_proj`, `.k_proj`, `.v_proj` and `.out_proj`,
    named as transformers names them, whose layer is the attention itself.
    """
    attentions = set()
    for path, layer in module.named_modules():
        if isinstance(layer, nn.MultiheadAttention) and layer._qkv_same_embed_dim:
            attentions.add(path)
            for part in ATTENTION_PARTS:
                yield f"{path}.{part}_proj", layer, part, attention_part_weight(layer, part)
            continue
        weight = getattr(layer, "weight", None)
        parent = path.rpartition(".")[0]
        if isinstance(weight, nn.Parameter) and weight.dim() in (2, 4) and parent not in attentions:
            yield path, layer, None, weight


def _target(root: LoraRoot, path: str, layer: nn.Module, part: str | None, network: NetworkConfig, rank: int,
            alpha: float) -> LoraTarget:
    kind = "lora" if network.network_type == "locon" else network.network_type
    return LoraTarget(*_keys(root, path), layer, rank, alpha, part, kind, network.lokr_factor,
                      network.lokr_full_matrix)


def _keys(root: LoraRoot, path: str) -> tuple[str, str]:
    """The kohya key and the diffusers/peft key of the layer at `path` in `root`."""
    return kohya_key(root.prefix, root.kohya_path(path)), f"{root.peft_prefix}.{root.peft_path(path)}"


def matches_targets(paths: tuple[str, ...], suffixes: list[str]) -> bool:
    """Whether any of a layer's `paths` (its own, or as kohya files name it: `mlp.c_fc` is `mlp.fc1`) ends with
    one of the `target_modules` suffixes."""
    return any(name == suffix or name.endswith("." + suffix) for name in paths for suffix in suffixes)


def network_from_file(roots: list[LoraRoot], path: Path, dropout: float = 0.0) -> LoraNetwork:
    """A `LoraNetwork` on the layers of `roots` that the LoRA file at `path` has weights for, loaded, with the
    file's ranks and alphas; each layer's module is of the type its tensors show (lora, dora, loha, lokr).

    Every layer of the file must exist in the model: a file for another model family is an error that
    names the layers it could not place.
    """
    layers = {}
    for root in roots:
        for module_path, layer, part, _ in _adaptable_layers(root.module):
            key, peft_key = _keys(root, module_path)
            layers[key] = (peft_key, layer, part)
    lora = read_lora(path, {peft_key: key for key, (peft_key, _, _) in layers.items()}).without_modules(
        never_run_keys(roots))
    unplaced = sorted(lora.module_keys - layers.keys())
    if unplaced:
        raise UserError(f"{path}: {len(unplaced)} of its {len(lora.module_keys)} layers do not exist in this model "
                        f"(e.g. {unplaced[0]}); is it a LoRA for another model family?")
    keys = sorted(lora.module_keys)
    modules = {key: module_from_file(layers[key][1], layers[key][2], lora.tensors_of(key), f"{path}: {key}",
                                     dropout) for key in keys}
    return LoraNetwork([LoraTarget(key, layers[key][0], layers[key][1], modules[key].rank, modules[key].alpha,
                                   layers[key][2], modules[key].kind) for key in keys], dropout, modules=modules)
