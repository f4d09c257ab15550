"""Resumable training state: optimizer, scheduler, step and random-number state beside the LoRA weights."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_trainer.errors import UserError
from lora_trainer.files import atomic_write

STATE_FILE = "training_state.pt"
_STATE_KEYS = {"lora_weights", "optimizer", "scheduler", "step", "epoch", "next_batch", "noise_generator",
               "data_rng", "torch_rng", "cuda_rng"}


@dataclass
class ResumePoint:
    """Where a resumed run continues."""

    step: int
    epoch: int
    next_batch: int
    global_batch_size: int | None = None
    """Examples per forward pass of all processes together, which the batch counts are in (None: a state saved
    before it was recorded)."""


def save_state(folder: Path, lora_weights: dict[str, torch.Tensor], optimizer_state: dict, scheduler, step: int,
               epoch: int, next_batch: int, noise_generator: torch.Generator, data_rng: random.Random,
               global_batch_size: int | None = None) -> Path:
    """Write everything `load_state` needs to continue this run exactly; `optimizer_state` is the optimizer's
    `state_dict()` (with a sharded model, whole: `sharding.full_optimizer_state`)."""
    state = {
        "lora_weights": lora_weights,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "step": step,
        "epoch": epoch,
        "next_batch": next_batch,
        "global_batch_size": global_batch_size,
        "noise_generator": noise_generator.get_state(),
        "data_rng": data_rng.getstate(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return atomic_write(Path(folder) / STATE_FILE, lambda tmp: torch.save(state, tmp))


def load_state(folder: Path, optimizer: torch.optim.Optimizer, scheduler, noise_generator: torch.Generator,
               data_rng: random.Random) -> tuple[ResumePoint, dict[str, torch.Tensor]]:
    """Restore optimizer, scheduler and RNG state from `folder`; return where to continue and the LoRA weights."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise UserError(f"resume: {path} does not exist (state folders are written with save_state: true)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a damaged file raises pickle, zip or EOF errors
        raise UserError(f"resume: {path} cannot be read ({type(error).__name__}: {error}); it is damaged: resume "
                        "from another .state folder") from None
    missing = sorted(_STATE_KEYS - set(state)) if isinstance(state, dict) else sorted(_STATE_KEYS)
    if missing:
        raise UserError(f"resume: {path} is not a training state written by this trainer (it lacks "
                        f"{', '.join(missing)}); resume from a .state folder that save_state wrote")
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        noise_generator.set_state(state["noise_generator"])
        data_rng.setstate(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
    except (ValueError, TypeError, KeyError, RuntimeError) as error:
        raise UserError(f"resume: the state in {path} does not fit this run ({error}); resume with the same "
                        "LoRA, optimizer and scheduler settings") from None
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return (ResumePoint(state["step"], state["epoch"], state["next_batch"], state.get("global_batch_size")),
            state["lora_weights"])
