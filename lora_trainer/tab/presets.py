"""Presets: training settings saved by name as the YAML the command line reads."""

from __future__ import annotations

import re
from pathlib import Path

from lora_trainer.config import TrainConfig, load_config, save_config
from lora_trainer.errors import UserError

PRESET_NAME = re.compile(r"^\w[\w .-]{0,63}$")


def preset_names(folder: Path) -> list[str]:
    """Names of the presets (YAML configs) in `folder`, sorted."""
    return sorted(path.stem for path in Path(folder).glob("*.yaml")) if Path(folder).is_dir() else []


def save_preset(folder: Path, name: str, config: TrainConfig, overwrite: bool = False) -> Path:
    """Save `config` as `folder/name.yaml`, the YAML the CLI reads; an existing preset only with `overwrite`."""
    path = _preset_path(folder, name)
    if path.exists() and not overwrite:
        raise UserError(f"A preset named {path.stem!r} exists. Tick 'Overwrite' to replace it, or pick another name.")
    save_config(config, path)
    return path


def load_preset(folder: Path, name: str) -> TrainConfig:
    """The config saved as preset `name`."""
    path = _preset_path(folder, name)
    if not path.is_file():
        raise UserError(f"There is no preset named {name!r} in {folder}.")
    return load_config(path)


def _preset_path(folder: Path, name: str) -> Path:
    name = (name or "").strip()
    if not PRESET_NAME.match(name) or name.endswith("."):
        raise UserError(f"Preset name {name!r} is not usable: use letters, digits, spaces, '-', '_' and '.', "
                        "starting with a letter or digit (at most 64 characters).")
    return Path(folder) / f"{name}.yaml"
