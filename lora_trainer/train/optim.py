"""Optimizers and learning-rate schedules, chosen by name (or import path) from the config, over the LoRA's
parameters in named groups."""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.optim.lr_scheduler import LambdaLR

from lora_trainer.config import OptimizerConfig, TrainConfig, warmup_steps_for
from lora_trainer.errors import UserError
from lora_trainer.lora.network import LoraNetwork


def lora_parameter_groups(network: LoraNetwork, settings: OptimizerConfig) -> list[dict]:
    """The network's parameters in named groups (`unet`, `text_encoder`), each with its learning rate. With
    LoRA+ (`loraplus_lr_ratio`), each group's up matrices form their own group (`unet_up`, ...) at that many
    times its rate (DoRA's magnitudes stay with the down matrices)."""
    groups = []
    for name, prefix, learning_rate in (("unet", "lora_unet", settings.effective_unet_lr),
                                        ("text_encoder", "lora_te", settings.effective_text_encoder_lr)):
        modules = [module for key, module in network.lora_modules.items() if key.startswith(prefix)]
        if settings.loraplus_lr_ratio:
            ups = {id(module.up) for module in modules}
            groups.append({"name": name, "params": [p for module in modules for p in module.parameters()
                                                    if id(p) not in ups], "lr": learning_rate})
            groups.append({"name": f"{name}_up", "params": [module.up for module in modules],
                           "lr": learning_rate * settings.loraplus_lr_ratio})
        else:
            groups.append({"name": name, "params": [p for module in modules for p in module.parameters()],
                           "lr": learning_rate})
    return [group for group in groups if group["params"]]


def make_optimizer(config: TrainConfig, parameter_groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer `optimizer_class` or `optimizer_type` names, over `parameter_groups` (each with its own
    `lr`), with `optimizer_args` over the defaults."""
    settings = config.optimizer
    if settings.optimizer_class:
        return _class_by_path(settings.optimizer_class)(parameter_groups, **settings.optimizer_args)
    arguments = {"weight_decay": settings.weight_decay, **settings.optimizer_args}
    name = settings.optimizer_type
    if name == "adamw":
        # The fused kernel exists for CPU and CUDA; on the CPU it steps a LoRA's ~100 tensors 4x faster than foreach.
        fused = all(p.device.type in ("cpu", "cuda") for group in parameter_groups for p in group["params"])
        return torch.optim.AdamW(parameter_groups, **{"fused": fused or None, "foreach": None if fused else True,
                                                      **arguments})
    if name == "adamw8bit":
        return _import_optional("bitsandbytes", name).optim.AdamW8bit(parameter_groups, **arguments)
    if name == "prodigy":
        return _import_optional("prodigyopt", name).Prodigy(parameter_groups, **arguments)
    if name == "lion":
        return _import_optional("lion_pytorch", name, package="lion-pytorch").Lion(parameter_groups, **arguments)
    if name == "adafactor":
        # A fixed learning rate, as kohya runs it: Adafactor's own relative step would ignore the configured one.
        optimization = _import_optional("transformers.optimization", name, package="transformers")
        return optimization.Adafactor(parameter_groups, **{"scale_parameter": False, "relative_step": False,
                                                           "warmup_init": False, **arguments})
    if name == "dadaptation":
        return _import_optional("dadaptation", name).DAdaptAdam(parameter_groups, **arguments)
    if name == "adamw_schedulefree":
        return _import_optional("schedulefree", name).AdamWScheduleFree(parameter_groups, **arguments)
    raise UserError(f"unknown optimizer {name!r}")


def start_training_weights(optimizer: torch.optim.Optimizer) -> None:
    """Put a schedule-free optimizer's parameters in their training state (a no-op for other optimizers)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if callable(getattr(inner, "train", None)):
        inner.train()


@contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside the block, a schedule-free optimizer's parameters hold the averaged weights that samples and saved
    files should show; other optimizers' parameters are left as they are."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not callable(getattr(inner, "eval", None)):
        yield
        return
    inner.eval()
    try:
        yield
    finally:
        inner.train()


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    """A schedule with `warmup_steps` of linear warmup, then `config.optimizer.scheduler` over the remaining steps,
    decaying to `lr_scheduler_min_lr_ratio` of the learning rate."""
    settings = config.optimizer
    warmup = warmup_steps_for(settings.warmup_steps, total_steps)
    decay_steps = max(1, total_steps - warmup)
    floor = settings.lr_scheduler_min_lr_ratio

    def decay(progress: float) -> float:
        if settings.scheduler == "linear":
            return 1.0 - progress
        if settings.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if settings.scheduler == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((settings.scheduler_num_cycles * progress) % 1.0)))
        return (1.0 - progress) ** settings.scheduler_power  # polynomial

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if settings.scheduler == "constant":
            return 1.0
        return floor + (1.0 - floor) * decay(min(1.0, (step - warmup) / decay_steps))

    return LambdaLR(optimizer, factor)


def _class_by_path(path: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    module = _import_optional(module_name, path, package=module_name.split(".")[0])
    optimizer_class = getattr(module, class_name, None)
    if not isinstance(optimizer_class, type):
        raise UserError(f"optimizer_class {path!r}: {module_name} has no class {class_name}")
    return optimizer_class


def _import_optional(module: str, optimizer: str, package: str | None = None):
    try:
        return importlib.import_module(module)
    except ImportError:
        package = package or module
        raise UserError(f"optimizer {optimizer!r} needs the {package} package: pip install {package}") from None
