"""Paths given over HTTP, confined to the host's datasets folder and Lora folder.

A request names folders relative to those folders (or absolute inside them). `..`, absolute paths elsewhere
and symlinks that lead out are refused before anything is read or written.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from lora_trainer.config import GROUPS, flat_config_values
from lora_trainer.errors import UserError
from lora_trainer.host import Host

DATASET_SIDE_KEYS = {"train_data_dir", "metadata_path", "mask_dir", "reg_data_dir", "validation_data_dir",
                     "sample_prompts_file"}
"""Path keys of a training config that name dataset files (relative to the datasets folder); the others
(`init_lora_weights`, `resume`, `logging_dir`) are relative to the Lora folder."""


class PathRefused(UserError):
    """A path given over HTTP that leads outside the folders the API may touch (HTTP 403)."""


def confined(path_text: Any, base: Path | None, allowed: list[Path], key: str) -> Path:
    """`path_text` (relative to `base`, or absolute) as a resolved path inside one of the `allowed` folders,
    symlinks followed; a `PathRefused` naming `key` otherwise."""
    if not isinstance(path_text, str) or not path_text.strip():
        raise UserError(f"'{key}' should be a path (a non-empty string), got {path_text!r}")
    roots = [Path(root).resolve() for root in allowed]
    where = " or ".join(str(root) for root in roots) or "(none: the host has no such folder)"
    raw = Path(path_text.strip())
    if ".." in raw.parts:
        raise PathRefused(f"'{key}': '..' is not allowed in paths given over the API; name a folder inside {where}")
    if base is None and not raw.is_absolute():
        raise PathRefused(f"'{key}': {path_text!r} is relative to a folder the host does not have; give an "
                          f"absolute path inside {where}")
    try:
        path = (Path(base or "/") / raw).resolve()
        path.exists()  # a name the file system refuses (too long, a NUL byte) fails here, not later
    except (OSError, ValueError) as error:
        raise UserError(f"'{key}': {path_text!r} is not a usable path ({error})") from None
    if not any(path.is_relative_to(root) for root in roots):
        raise PathRefused(f"'{key}': {path_text!r} leads outside the folders the API may use ({where})")
    return path


def dataset_path(host: Host, name: Any, key: str = "folder") -> Path:
    """A path below the host's datasets folder, given relative to it."""
    datasets = host.datasets_dir()
    return confined(name, datasets, [datasets] if datasets is not None else [], key)


def lora_path(host: Host, name: Any, key: str) -> Path:
    """A path below the host's Lora folder, given relative to it."""
    return confined(name, Path(host.lora_dir()), [Path(host.lora_dir())], key)


def confined_train_config(host: Host, config: Any) -> dict[str, Any]:
    """A training config given over HTTP (grouped or flat keys), its paths made absolute and confined; it saves
    into the Lora folder and writes a TensorBoard log only where asked to."""
    if not isinstance(config, dict):
        raise UserError("'config' should be a mapping of the training settings (the YAML config's keys)")
    values = flat_config_values(config)
    if values.get("train_data_dir") is None and not values.get("subsets"):
        raise UserError("a train job needs 'train_data_dir': its dataset folder, relative to the datasets folder "
                        f"{host.datasets_dir()}")
    lora_dir = Path(host.lora_dir()).resolve()
    datasets = host.datasets_dir()
    allowed = [lora_dir] + ([Path(datasets)] if datasets is not None else [])
    for key in PATH_KEYS & values.keys():
        if values[key] is None:
            continue
        base = datasets if key in DATASET_SIDE_KEYS else lora_dir
        values[key] = str(confined(_text(values[key]), base, allowed, key))
    if "output_dir" in values and confined(_text(values["output_dir"]), lora_dir, [lora_dir],
                                           "output_dir") != lora_dir:
        raise PathRefused(f"'output_dir': jobs save into the Lora folder {lora_dir}; leave output_dir out")
    values["output_dir"] = str(lora_dir)
    values.setdefault("logging_dir", None)
    for number, subset in enumerate(values.get("subsets") or [], start=1):
        if isinstance(subset, dict) and "image_dir" in subset:
            subset["image_dir"] = str(confined(_text(subset["image_dir"]), datasets, allowed,
                                               f"subsets[{number}].image_dir"))
    return values


def _text(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _path_keys() -> set[str]:
    keys = set()
    for group_type in GROUPS.values():
        hints = typing.get_type_hints(group_type)
        keys |= {f.name for f in dataclasses.fields(group_type) if Path in typing.get_args(hints[f.name])
                 or hints[f.name] is Path}
    return keys - {"output_dir"}


PATH_KEYS = _path_keys()
"""The training config's keys that hold a path (besides `output_dir`, which is always the Lora folder)."""
