"""The language model and its LoRA: a transformers causal LM (optionally 4-bit for QLoRA) with a peft LoRA,
started from an existing adapter when asked, saved as peft adapter folders and merged models."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from lora_trainer.errors import UserError
from lora_trainer.files import write_new_folder
from lora_trainer.llm.config import ModelConfig, NetworkConfig
from lora_trainer.train.sharding import full_tensor, sharded_like

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_tokenizer(base_model: Path):
    """The base model's fast tokenizer, with a padding token (its EOS when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    except (OSError, ValueError) as error:
        raise UserError(f"base_model {base_model}: no tokenizer could be loaded from it ({error})") from None
    if not tokenizer.is_fast:
        raise UserError(f"base_model {base_model}: its tokenizer has no fast (tokenizers) version, which the "
                        "trainer needs to tell responses from prompts; add a tokenizer.json")
    if tokenizer.eos_token is None:
        raise UserError(f"base_model {base_model}: its tokenizer has no EOS token, so answers could not end")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(config: ModelConfig, device: torch.device):
    """The causal LM from `config.base_model` in its dtype on `device` (4-bit NF4 with `load_in_4bit`), frozen."""
    from transformers import AutoModelForCausalLM

    options: dict = {"dtype": _DTYPES[config.dtype]}
    if config.load_in_4bit:
        options["quantization_config"] = _four_bit_config(config, device)
        options["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(config.base_model), **options)
    except (OSError, ValueError) as error:
        raise UserError(f"base_model {config.base_model} is not a transformers causal language model folder "
                        f"({error})") from None
    if not config.load_in_4bit:
        model.to(device)
    model.requires_grad_(False)
    model.config.use_cache = False
    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def add_lora(model, network: NetworkConfig, base_model: Path):
    """`model` wrapped in a peft model with a fresh LoRA as `network` describes (trainable, fp32)."""
    from peft import LoraConfig, get_peft_model

    targets = network.target_modules
    lora_config = LoraConfig(
        r=network.lora_rank, lora_alpha=network.lora_alpha, lora_dropout=network.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets, use_dora=network.use_dora,
        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=str(base_model))
    try:
        return get_peft_model(model, lora_config)
    except ValueError as error:  # no module matched the targets
        raise UserError(f"target_modules {targets}: {error}") from None


def adapter_weights(peft_model) -> dict[str, torch.Tensor]:
    """The LoRA weights under the names peft saves them (`base_model.model.<path>.lora_A.weight`, ...), whole
    also where the model is sharded (FSDP), which makes this a collective call every process must make."""
    from peft import get_peft_model_state_dict

    return {name: full_tensor(tensor).detach().contiguous()
            for name, tensor in get_peft_model_state_dict(peft_model).items()}


def load_adapter_weights(peft_model, weights: dict[str, torch.Tensor], what: str) -> None:
    """Put `weights` (peft names) into the model's LoRA after checking they are the same LoRA: the same layers
    and the same rank; otherwise a `UserError` says what differs."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = adapter_weights(peft_model)
    if set(weights) != set(expected) or any(weights[name].shape != expected[name].shape for name in expected):
        raise UserError(f"{what} is not a LoRA of this config's shape: {_difference(weights, expected)}")
    own = get_peft_model_state_dict(peft_model)
    set_peft_model_state_dict(peft_model, {name: sharded_like(tensor, own[name]) for name, tensor in weights.items()})


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """(weights, adapter config or {}, metadata) of a peft adapter folder or its adapter_model.safetensors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    weights_file = path / ADAPTER_WEIGHTS if path.is_dir() else path
    if not weights_file.is_file():
        raise UserError(f"{path} holds no {ADAPTER_WEIGHTS}: give a peft adapter folder or its safetensors file")
    try:
        with safe_open(str(weights_file), framework="pt") as opened:
            weights = {name: opened.get_tensor(name) for name in opened.keys()}
            metadata = opened.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise UserError(f"{weights_file} cannot be read as safetensors ({error})") from None
    config_file = weights_file.parent / ADAPTER_CONFIG
    adapter_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    return weights, adapter_config, metadata


def check_adapter_config(adapter_config: dict, network: NetworkConfig, what: str) -> None:
    """A `UserError` when the adapter's recorded alpha or DoRA setting differs from `network`'s: its weights
    would then not compute what they computed when saved."""
    differences = []
    if "lora_alpha" in adapter_config and float(adapter_config["lora_alpha"]) != network.lora_alpha:
        differences.append(f"lora_alpha {adapter_config['lora_alpha']} there, {network.lora_alpha} here")
    if "use_dora" in adapter_config and bool(adapter_config["use_dora"]) != network.use_dora:
        differences.append(f"use_dora {adapter_config['use_dora']} there, {network.use_dora} here")
    if differences:
        raise UserError(f"{what} was trained with other LoRA settings ({'; '.join(differences)}); set them as "
                        "it had them")


def save_adapter(peft_model, weights: dict[str, torch.Tensor], folder: Path, metadata: dict[str, str],
                 write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write the peft adapter folder (adapter_config.json, adapter_model.safetensors of `weights` with
    `metadata`) at `folder`, or `folder-2`, ... when that is taken; `write_extra(tmp_folder)` adds files before
    it is named."""
    from safetensors.torch import save_file

    def write(tmp_folder: Path) -> None:
        peft_model.peft_config["default"].save_pretrained(str(tmp_folder))
        save_file(weights, str(tmp_folder / ADAPTER_WEIGHTS), metadata={"format": "pt", **metadata})
        if write_extra is not None:
            write_extra(tmp_folder)

    return write_new_folder(folder, write)


def save_merged_model(peft_model, tokenizer, folder: Path) -> Path:
    """Merge the LoRA into the base weights (in place: the model is plain afterwards) and write the model and
    tokenizer as a transformers folder at `folder` (or `folder-2`, ...)."""
    merged = peft_model.merge_and_unload()

    def write(tmp_folder: Path) -> None:
        merged.save_pretrained(str(tmp_folder))
        tokenizer.save_pretrained(str(tmp_folder))

    return write_new_folder(folder, write)


def _four_bit_config(config: ModelConfig, device: torch.device):
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("load_in_4bit (QLoRA) needs the bitsandbytes package: pip install bitsandbytes") from None
    if device.type != "cuda" and not _quantizes_in_4bit_on(device):
        raise UserError(f"load_in_4bit (QLoRA): bitsandbytes {bitsandbytes.__version__} has no 4-bit layers for "
                        f"the {device.type} (its recent releases have them on the CPU: pip install -U bitsandbytes). "
                        "Or set load_in_4bit: false (and dtype: bf16 or fp32) to train here")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=_DTYPES[config.dtype])


def _quantizes_in_4bit_on(device: torch.device) -> bool:
    """Whether the installed bitsandbytes has NF4 kernels for `device` (older releases: CUDA only); asked of the
    library itself, as its releases differ in which devices they serve."""
    from bitsandbytes.functional import quantize_4bit

    try:
        quantize_4bit(torch.ones(64, device=device), quant_type="nf4")
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return False
    return True


def _difference(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """What differs between two LoRAs' weights, in the config's words (rank, target modules, DoRA)."""
    def ranks(weights):
        return sorted({tensor.shape[0] for name, tensor in weights.items() if ".lora_A." in name})

    def targets(weights):
        return sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in weights if ".lora_" in name})

    def layers(weights):
        return {name.split(".lora_")[0] for name in weights if ".lora_" in name}

    parts = []
    if ranks(found) != ranks(expected):
        parts.append(f"its rank is {_listed(ranks(found))}, the config's lora_rank is {_listed(ranks(expected))}")
    if targets(found) != targets(expected):
        parts.append(f"it adapts {_listed(targets(found))}, the config's target_modules select "
                     f"{_listed(targets(expected))}")
    elif layers(found) != layers(expected):
        parts.append(f"it adapts {len(layers(found))} layers, this model has {len(layers(expected))} of those "
                     "(another architecture or depth)")
    dora_found = any("lora_magnitude_vector" in name for name in found)
    if dora_found != any("lora_magnitude_vector" in name for name in expected):
        parts.append(f"it is {'' if dora_found else 'not '}a DoRA; set use_dora: {str(dora_found).lower()}")
    return "; ".join(parts) or "the weight names or shapes differ (another model?)"


def _listed(values: list) -> str:
    return ", ".join(str(value) for value in values) or "nothing"
