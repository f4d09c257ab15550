"""The typed config of a language-model run (`task: llm`): fields in groups, flat YAML keys.

A YAML file may name the keys flat (`lora_rank: 8`) as LoRA users write them, or nested under their group
(`network: {lora_rank: 8}`); command-line overrides are `--lora_rank 8` or `--network.lora_rank 8`. The keys are
read and checked by the image config's machinery (`lora_trainer.config`): each group's `__post_init__` coerces
its values to their types and checks their ranges, so a config built in code is checked the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lora_trainer.config import (
    LoggingConfig,
    Optimizer,
    Scheduler,
    _check_group,
    _plain,
    flat_config_values,
    tag_can_name,
)
from lora_trainer.errors import UserError

DataFormat = Literal["auto", "text", "instruction", "chat"]
Template = Literal["auto", "chat_template", "llama2", "plain"]
Overlong = Literal["truncate", "drop"]
Dtype = Literal["fp32", "bf16", "fp16"]

DEFAULT_TARGET_MODULES = ["q_proj", "v_proj"]


@dataclass
class DataConfig:
    """Where the examples are and how they become token sequences."""

    train_data: Path | None = None
    """A file (.jsonl, .json, .csv, .txt) or a folder of them. Records hold `text` (raw text), `instruction` /
    `input` / `output` (Alpaca) or `messages` (chat: a list of {role, content}); a .txt file is raw text."""
    data_format: DataFormat = "auto"
    """Which of those the records are; auto decides per record from its fields."""
    template: Template = "auto"
    """How instruction and chat examples become text: the tokenizer's chat template, the Llama-2
    `<s>[INST] ... [/INST] answer </s>` template, or plain (prompt, newline, answer). auto: the chat template
    when the tokenizer has one, else llama2. Recorded in every saved adapter."""
    max_seq_length: int = 512
    """Tokens per example (raw text is cut into blocks of this length)."""
    overlong: Overlong = "truncate"
    """An instruction/chat example longer than max_seq_length is cut at the end or dropped; either is counted."""
    packing: bool = False
    """Put several instruction/chat examples into one sequence of up to max_seq_length tokens."""
    train_on_prompt: bool = False
    """Also train on the prompt tokens of instruction/chat examples (default: loss on the responses only)."""
    validation_data: Path | None = None
    """Examples for the validation loss, in the same formats."""
    validation_split: float = 0.0
    """Or this fraction of train_data, held out (seeded) for the validation loss."""

    def __post_init__(self) -> None:
        _check_group(self)
        if self.max_seq_length < 2:
            raise UserError(f"config key 'max_seq_length' must be at least 2, got {self.max_seq_length}")
        if not 0.0 <= self.validation_split < 1.0:
            raise UserError(f"config key 'validation_split' must be in [0, 1), got {self.validation_split}")
        if self.validation_split and self.validation_data is not None:
            raise UserError("give validation_data or validation_split, not both")


@dataclass
class ModelConfig:
    """The base model and how it is loaded."""

    base_model: Path | None = None
    """A transformers AutoModelForCausalLM folder (config.json, weights, tokenizer files)."""
    dtype: Dtype = "fp32"
    """Weights and compute of the base model; the LoRA weights stay fp32."""
    load_in_4bit: bool = False
    """QLoRA: the base model's linear layers in 4-bit NF4 (bitsandbytes), computed in `dtype`."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    device: str | None = None
    """cuda, cpu, cuda:1, ... (default: cuda when available)."""

    def __post_init__(self) -> None:
        _check_group(self)


@dataclass
class NetworkConfig:
    """The LoRA: peft's LoraConfig in the keys LoRA users write."""

    lora_rank: int = 8
    """Rank r of each LoRA matrix pair."""
    lora_alpha: float = 16.0
    """Scale numerator: the LoRA output is multiplied by alpha/rank."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    """Module names to adapt (suffixes, as peft matches them), or [all-linear] for every linear layer but the
    output head."""
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA) via peft."""
    init_lora_weights: Path | None = None
    """Start from this peft adapter (its folder or its adapter_model.safetensors); rank and targets must match."""

    def __post_init__(self) -> None:
        _check_group(self)
        if not self.target_modules:
            raise UserError("config key 'target_modules' is empty: name the modules to adapt, e.g. [q_proj, v_proj]")


@dataclass
class OptimizerConfig:
    """Optimizer and learning-rate schedule (the names `lora_trainer.train.optim` reads)."""

    optimizer_type: Optimizer = "adamw"
    """adamw (torch), adamw8bit (bitsandbytes), prodigy (prodigyopt), lion (lion-pytorch), adafactor, dadaptation
    or adamw_schedulefree; flat key `optimizer`."""
    optimizer_class: str | None = None
    """Any optimizer class by its import path (`torch.optim.SGD`), instead of `optimizer_type`."""
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the optimizer, over the defaults (betas, eps, ...)."""
    learning_rate: float = 2e-4
    """Learning rate of every LoRA parameter."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    scheduler: Scheduler = "constant"
    """Learning-rate schedule after the warmup."""
    warmup_steps: int | float = 0
    """Optimizer steps of linear warmup from 0 (below 1: a share of the run)."""
    lr_scheduler_min_lr_ratio: float = 0.0
    """The decaying schedules end at this fraction of the learning rate."""
    scheduler_num_cycles: int = 1
    """Restarts for cosine_with_restarts."""
    scheduler_power: float = 1.0
    """Power of the polynomial schedule."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this (None: no clipping)."""

    def __post_init__(self) -> None:
        _check_group(self)


@dataclass
class TrainingConfig:
    """How long and in what batches."""

    batch_size: int = 4
    """Sequences per forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step."""
    epochs: int = 3
    """Passes over the training examples; ignored when max_train_steps is set."""
    max_train_steps: int | None = None
    """Stop after this many optimizer steps."""
    seed: int = 42
    """Seed for the data order, the validation split, dropout and the LoRA initialisation."""
    distributed_timeout_seconds: float = 600.0
    """With several processes: how long one waits for the others (while the main one saves, evaluates or
    samples, or when one died) before it stops with an error instead of hanging."""

    def __post_init__(self) -> None:
        _check_group(self)
        if self.distributed_timeout_seconds <= 0:
            raise UserError("config key 'distributed_timeout_seconds' must be a positive number of seconds, got "
                            f"{self.distributed_timeout_seconds}")


@dataclass
class SavingConfig:
    """Adapter folders: `name` at the end, `name-e0002` / `name-s000500` on the way, never overwritten."""

    output_dir: Path = Path("output")
    """Folder for the adapter folders."""
    output_name: str = "lora"
    """Name of the final adapter folder."""
    save_every_n_epochs: int | None = None
    """Also save after every N epochs."""
    save_every_n_steps: int | None = None
    """Also save after every N optimizer steps."""
    save_state: bool = False
    """With each save, also write the optimizer/scheduler/RNG state into the folder, so `resume` can continue."""
    resume: Path | None = None
    """An adapter folder saved with save_state: continue that run exactly."""
    merge: bool = False
    """Also write the base model with the final adapter merged in (`name-merged`, a transformers folder)."""

    def __post_init__(self) -> None:
        _check_group(self)
        if not self.output_name or "/" in self.output_name or "\\" in self.output_name or \
                self.output_name in (".", "..") or not tag_can_name(self.output_name):
            raise UserError(f"output_name {self.output_name!r} must be a plain folder name (no '/', ':', '<', '>')")


@dataclass
class SamplingConfig:
    """Greedy generations for a few prompts while training, in the adapter's template."""

    sample_prompts: list[str] = field(default_factory=list, metadata={"commas_are_text": True})
    """User prompts to answer (a list, or one string for one prompt)."""
    sample_every_n_steps: int | None = None
    """Answer them every N steps; they are always answered at the end."""
    sample_max_new_tokens: int = 64
    """Longest answer generated."""

    def __post_init__(self) -> None:
        _check_group(self)
        if self.sample_max_new_tokens < 1:
            raise UserError(f"config key 'sample_max_new_tokens' must be at least 1, got {self.sample_max_new_tokens}")


@dataclass
class LLMTrainConfig:
    """Everything one language-model LoRA run needs. Paths may be relative to the directory the run starts in."""

    task: Literal["llm"] = "llm"
    """Selects this trainer in `python -m lora_trainer train`."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    saving: SavingConfig = field(default_factory=SavingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if self.saving.merge and self.model.load_in_4bit:
            raise UserError("merge needs the base model's full-precision weights: with load_in_4bit, merge the "
                            "adapter into the unquantised model afterwards (peft's merge_and_unload)")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready values, nested by group (paths as strings)."""
        return {"task": self.task, **{group: {f.name: _plain(getattr(getattr(self, group), f.name))
                                              for f in dataclasses.fields(getattr(self, group))}
                                      for group in GROUPS}}



GROUPS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "network": NetworkConfig,
                           "optimizer": OptimizerConfig, "training": TrainingConfig, "saving": SavingConfig,
                           "logging": LoggingConfig, "sampling": SamplingConfig}


def llm_config_from_dict(values: dict[str, Any], overrides: dict[str, Any] | None = None) -> LLMTrainConfig:
    """Build an `LLMTrainConfig` from a config file's values and command-line `overrides` (flat keys, group
    sections or `group.key` keys; an override wins); unknown keys and wrong types are errors naming the key."""
    values, overrides = dict(values), dict(overrides or {})
    task = overrides.pop("task", values.pop("task", "llm"))
    if task != "llm":
        raise UserError(f"config key 'task' must be 'llm' for a language-model run, got {task!r}")
    flat = flat_config_values(values, GROUPS)
    flat.update(flat_config_values(overrides, GROUPS))
    by_group: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    field_groups = {f.name: group for group, group_type in GROUPS.items() for f in dataclasses.fields(group_type)}
    for name, value in flat.items():
        by_group[field_groups[name]][name] = value
    return LLMTrainConfig(**{group: GROUPS[group](**items) for group, items in by_group.items()})
