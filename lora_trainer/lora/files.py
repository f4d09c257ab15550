"""LoRA files: kohya/LyCORIS-format `.safetensors` with metadata, the diffusers/peft layout, and reading both."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_trainer.errors import UserError
from lora_trainer.files import write_new_file
from lora_trainer.lora.network import LoraNetwork
from lora_trainer.lora.network_types import FILE_KINDS, file_module_kind, tensor_mismatch


def save_kohya(path: Path, network: LoraNetwork, metadata: dict[str, str]) -> Path:
    """Write `network` as a new kohya-format file at `path` (or `stem-2`, ... when taken); returns its path."""
    state = network.kohya_state_dict()
    return write_new_file(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def save_diffusers_layout(path: Path, network: LoraNetwork, metadata: dict[str, str]) -> Path:
    """Write `network` (lora only) in the diffusers/peft layout, alpha folded into `lora_B` (peft's own convention
    for a file with no alphas), as a new file at `path` (or `stem-2`, ... when taken); returns its path."""
    state: dict[str, torch.Tensor] = {}
    for key, module in network.lora_modules.items():
        if module.kind != "lora":
            raise UserError(f"the diffusers/peft layout holds plain LoRA only, not {module.kind}; turn off "
                            "save_diffusers_format")
        prefix = network.peft_keys[key]
        state[f"{prefix}.lora_A.weight"] = module.down.detach().float().cpu().contiguous()
        state[f"{prefix}.lora_B.weight"] = (module.up.detach().float() * module.scale).cpu().contiguous()
    return write_new_file(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


@dataclass
class LoraFile:
    """A LoRA read from disk, normalised to kohya keys."""

    state: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def module_keys(self) -> set[str]:
        """The kohya module keys (`lora_unet_..._to_q`) this file has weights for."""
        return {key.split(".", 1)[0] for key in self.state if _module_suffix(key) in FILE_KINDS}

    def tensors_of(self, module_key: str) -> dict[str, torch.Tensor]:
        """One module's tensors by their suffix (`lora_down.weight`, `alpha`, `hada_w1_a`, ...)."""
        prefix = f"{module_key}."
        return {key[len(prefix):]: tensor for key, tensor in self.state.items() if key.startswith(prefix)}

    def kind_of(self, module_key: str) -> str:
        """The network type of one module's tensors: lora, dora, loha or lokr."""
        return file_module_kind(self.tensors_of(module_key))


def read_lora(path: Path, peft_to_kohya: dict[str, str]) -> LoraFile:
    """Read a kohya or diffusers/peft LoRA `.safetensors` file into kohya keys.

    peft layer names are renamed through `peft_to_kohya`; names it lacks are kept, so mismatches can be reported.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise UserError(f"{path} is not a readable .safetensors file ({error})") from None
    if any(_module_suffix(key) in FILE_KINDS for key in state):
        return LoraFile(state, metadata)
    if any(key.endswith(".lora_A.weight") for key in state):
        return LoraFile(_peft_to_kohya(state, peft_to_kohya), metadata)
    raise UserError(f"{path} has neither kohya/LyCORIS (lora_down/lora_up, hada_w1_a/..., lokr_w1/...) nor peft "
                    "(lora_A/lora_B) LoRA weights")


def _module_suffix(key: str) -> str:
    """`lora_unet_x.lora_down.weight` -> `lora_down.weight`; `lora_unet_x.hada_w1_a` -> `hada_w1_a`."""
    return key.split(".", 1)[1] if "." in key else ""


def check_matches_network(lora: LoraFile, network: LoraNetwork, source: str) -> None:
    """Raise a `UserError` that says exactly what differs when `lora` cannot initialise `network`."""
    wanted = set(network.lora_modules.keys())
    have = lora.module_keys
    problems = []
    if missing := sorted(wanted - have):
        problems.append(f"{len(missing)} layers this run trains are not in the file (e.g. {missing[0]})")
    if extra := sorted(have - wanted):
        problems.append(f"{len(extra)} layers in the file are not trained by this run (e.g. {extra[0]})")
    shared = sorted(have & wanted)
    kinds = [(key, lora.kind_of(key), network.lora_modules[key].kind) for key in shared
             if lora.kind_of(key) != network.lora_modules[key].kind]
    if kinds:
        key, file_kind, run_kind = kinds[0]
        problems.append(f"the file is {file_kind} where this run trains {run_kind} (e.g. {key}); set network_type "
                        f"to the file's")
    ranks = {(key, _rank(lora.tensors_of(key)), network.lora_modules[key].rank) for key in shared
             if not kinds and network.lora_modules[key].kind in ("lora", "dora", "loha")
             and _rank(lora.tensors_of(key)) != network.lora_modules[key].rank}
    if ranks:
        key, file_rank, run_rank = sorted(ranks)[0]
        problems.append(f"rank differs on {len(ranks)} layers: the file has rank {file_rank}, this run "
                        f"uses {run_rank} (e.g. {key}); set lora_rank/conv_rank to the file's")
    for key in shared if not kinds and not ranks else []:
        if mismatch := tensor_mismatch(lora.tensors_of(key), network.lora_modules[key].file_tensors()):
            problems.append(f"{key}: {mismatch} in this run (a file for another model family, or other "
                            "lokr_factor/lokr_full_matrix/lora_rank?)")
            break
    if problems:
        raise UserError(f"{source} does not match this run: " + "; ".join(problems))


def _rank(tensors: dict[str, torch.Tensor]) -> int:
    """The rank of one lora, dora or loha module's tensors."""
    return int((tensors.get("lora_down.weight", tensors.get("hada_w1_b"))).shape[0])


def _peft_to_kohya(state: dict[str, torch.Tensor], kohya_keys: dict[str, str]) -> dict[str, torch.Tensor]:
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if not match:
            continue
        module_key = kohya_keys.get(match[1], match[1])
        if match[2] == "A":
            converted[f"{module_key}.lora_down.weight"] = tensor
        else:  # peft files carry no alpha: the scale is already in lora_B
            converted[f"{module_key}.lora_up.weight"] = tensor
            converted[f"{module_key}.alpha"] = torch.tensor(float(tensor.shape[1]))
    return converted
