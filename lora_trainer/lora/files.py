"""LoRA files: kohya/LyCORIS-format `.safetensors` with metadata, the diffusers/peft layout, and reading the
layouts kohya, LyCORIS, peft and diffusers' training scripts write."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_trainer.errors import UserError
from lora_trainer.files import write_new_file
from lora_trainer.lora.metadata import safetensors_hashes
from lora_trainer.lora.network import LoraNetwork
from lora_trainer.lora.network_types import FILE_KINDS, file_module_kind, tensor_mismatch

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""The tensor type of each `save_precision`."""


def save_kohya(path: Path, network: LoraNetwork, metadata: dict[str, str], precision: str = "float") -> Path:
    """Write `network` as a new kohya-format file at `path` (or `stem-2`, ... when taken) in `precision`
    (float, fp16, bf16), with kohya's precomputed hashes; returns its path."""
    state = {key: tensor.to(SAVE_DTYPES[precision]) for key, tensor in network.kohya_state_dict().items()}
    metadata = {**metadata, **safetensors_hashes(state, metadata)}
    return write_new_file(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def save_diffusers_layout(path: Path, network: LoraNetwork, metadata: dict[str, str], precision: str = "float") -> Path:
    """Write `network` (lora only) in the diffusers/peft layout in `precision`, alpha folded into `lora_B` (peft's
    own convention for a file with no alphas), as a new file at `path` (or `stem-2`, ... when taken); returns its
    path."""
    state: dict[str, torch.Tensor] = {}
    for key, module in network.lora_modules.items():
        if module.kind != "lora":
            raise UserError(f"the diffusers/peft layout holds plain LoRA only, not {module.kind}; turn off "
                            "save_diffusers_format")
        prefix = network.peft_keys[key]
        state[f"{prefix}.lora_A.weight"] = module.down.detach().to(SAVE_DTYPES[precision]).cpu().contiguous()
        state[f"{prefix}.lora_B.weight"] = (module.up.detach().float() * module.scale).to(
            SAVE_DTYPES[precision]).cpu().contiguous()
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

    def without_modules(self, module_keys: set[str]) -> LoraFile:
        """This file without the tensors of `module_keys`."""
        return LoraFile({key: tensor for key, tensor in self.state.items() if key.split(".", 1)[0] not in module_keys},
                        self.metadata)

    def kind_of(self, module_key: str) -> str:
        """The network type of one module's tensors: lora, dora, loha or lokr."""
        return file_module_kind(self.tensors_of(module_key))


def read_lora(path: Path, peft_to_kohya: dict[str, str]) -> LoraFile:
    """Read a LoRA `.safetensors` file into kohya keys: kohya's layout, peft's (`lora_A`/`lora_B`, with the
    alphas diffusers keeps in its metadata), or the layouts of diffusers' training scripts (`.lora.down`,
    `.lora_linear_layer.down`, `.processor.to_q_lora.down`).

    Layer names are renamed through `peft_to_kohya` (diffusers/peft module paths to kohya keys); names it lacks
    are kept, so mismatches can be reported.
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
    converted = _diffusers_to_kohya(state, peft_to_kohya, _adapter_configs(metadata, path))
    if not converted:
        raise UserError(f"{path} has no LoRA weights in a layout this trainer reads: kohya/LyCORIS (lora_down/"
                        "lora_up, hada_w1_a/..., lokr_w1/...), peft (lora_A/lora_B) or diffusers (lora.down/lora.up)")
    return LoraFile(converted, metadata)


def _module_suffix(key: str) -> str:
    """`lora_unet_x.lora_down.weight` -> `lora_down.weight`; `lora_unet_x.hada_w1_a` -> `hada_w1_a`."""
    return key.split(".", 1)[1] if "." in key else ""


def check_matches_network(lora: LoraFile, network: LoraNetwork, source: str) -> None:
    """Raise a `UserError` that says exactly what differs when `lora` cannot initialise `network`."""
    wanted = set(network.lora_modules.keys())
    have = lora.module_keys
    problems = []
    if missing := sorted(wanted - have):
        problems.append(f"{len(missing)} layers this run trains are not in the file (e.g. {missing[0]}): set "
                        "target_modules/text_encoder_target_modules to the file's (`attention` for attention only), "
                        "or dim_from_weights: true")
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
                        f"uses {run_rank} (e.g. {key}); set lora_rank/conv_rank to the file's, or "
                        "dim_from_weights: true")
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


_DIFFUSERS_KEY_PATTERNS = [
    (re.compile(r"(.+)\.lora_(A|B)(?:\.default)?\.weight"), {"A": "down", "B": "up"}),
    (re.compile(r"(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight"), {"down": "down", "up": "up"}),
]
_UNET_PROCESSOR_KEY = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_TEXT_ATTENTION_KEY = re.compile(r"(.+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_TEXT_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _diffusers_module_key(key: str) -> tuple[str, str] | None:
    """The diffusers module path of a diffusers/peft LoRA key and which matrix it holds ("down", "up", "alpha"),
    written the way this trainer names layers (`unet.` prefix, `text_model.` in CLIP text encoders)."""
    key = key.removeprefix("base_model.model.")
    module, matrix = None, None
    if match := _UNET_PROCESSOR_KEY.fullmatch(key):
        module, matrix = f"{match[1]}.{'to_out.0' if match[2] == 'to_out' else match[2]}", match[3]
    elif match := _TEXT_ATTENTION_KEY.fullmatch(key):
        module, matrix = f"{match[1]}.{_TEXT_PROJECTIONS[match[2]]}", match[3]
    elif key.endswith(".alpha"):
        module, matrix = key.removesuffix(".alpha"), "alpha"
    else:
        for pattern, matrices in _DIFFUSERS_KEY_PATTERNS:
            if match := pattern.fullmatch(key):
                module, matrix = match[1], matrices[match[2]]
                break
    if module is None:
        return None
    if module.split(".", 1)[0] not in _COMPONENTS:  # diffusers' attention-processor files name UNet layers bare
        module = f"unet.{module}"
    # transformers 5 dropped the `text_model.` level of CLIP text encoders from module paths
    module = re.sub(r"^(text_encoder(?:_2)?)\.(?=encoder\.|embeddings\.|final_layer_norm)", r"\1.text_model.", module)
    return module, matrix


def _adapter_configs(metadata: dict[str, str], path: Path) -> dict[str, dict]:
    """Each component's peft `LoraConfig` values (`lora_alpha`, `alpha_pattern`, `use_rslora`, ...) from the
    `lora_adapter_metadata` diffusers writes, by component (`unet`, `text_encoder`, ...)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"{path}: its lora_adapter_metadata is not valid JSON") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _peft_alpha(module: str, rank: int, configs: dict[str, dict]) -> float:
    """The kohya alpha (scale x rank) that gives `module` the scale peft gives it: lora_alpha / rank (or
    / sqrt(rank) with rsLoRA), lora_alpha from the config's alpha_pattern where one matches; without a
    config, scale 1 (the alpha folded into lora_B, as diffusers saves it)."""
    component, _, inner = module.partition(".")
    config = configs.get(component)
    if config is None or config.get("lora_alpha") is None:
        return float(rank)
    alpha = float(config["lora_alpha"])
    for pattern, pattern_alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", inner):  # peft's own matching: the pattern ends the module path
            alpha = float(pattern_alpha)
            break
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return scale * rank


def _diffusers_to_kohya(state: dict[str, torch.Tensor], kohya_keys: dict[str, str],
                        configs: dict[str, dict]) -> dict[str, torch.Tensor]:
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if parsed := _diffusers_module_key(key):
            by_module.setdefault(parsed[0], {})[parsed[1]] = tensor
    converted: dict[str, torch.Tensor] = {}
    for module, matrices in by_module.items():
        if "down" not in matrices or "up" not in matrices:
            continue
        kohya = kohya_keys.get(module, module)
        rank = int(matrices["down"].shape[0])
        alpha = float(matrices["alpha"]) if "alpha" in matrices else _peft_alpha(module, rank, configs)
        converted[f"{kohya}.lora_down.weight"] = matrices["down"]
        converted[f"{kohya}.lora_up.weight"] = matrices["up"]
        converted[f"{kohya}.alpha"] = torch.tensor(alpha)
    return converted
