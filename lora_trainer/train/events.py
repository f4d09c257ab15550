"""What a training run tells the outside world, and how the outside world steers it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from lora_trainer.train.memory import MemoryPlan


@dataclass
class RunPlan:
    """The shape of a run, known before the first step."""

    total_steps: int
    epochs: int
    steps_per_epoch: int
    summary: str
    memory: MemoryPlan | None = None
    """The run's memory plan (its line is in `summary` too)."""


@dataclass
class StepReport:
    """Progress after an optimizer step. `loss` is the mean since the last report (read every few steps)."""

    step: int
    total_steps: int
    epoch: int
    loss: float | None
    learning_rate: float
    steps_per_second: float
    """Optimizer steps per second (trainers' "it/s"), measured between the last two loss reports."""
    samples_per_second: float
    """Training images per second: steps per second times batch size times gradient accumulation."""
    seconds_elapsed: float
    seconds_left: float


class TrainingEvents:
    """Callbacks of a run; the defaults do nothing. The WebUI tab and the CLI subclass it."""

    def on_start(self, plan: RunPlan) -> None:
        """The data is scanned and cached; training starts."""

    def on_message(self, text: str) -> None:
        """A line for the user (what is being prepared, what was skipped)."""

    def on_caching(self, done: int, total: int) -> None:
        """While the latents are cached, before training: `done` of `total` images are encoded."""

    def on_step(self, report: StepReport) -> None:
        """After each optimizer step."""

    def on_busy(self, activity: str) -> None:
        """The run pauses stepping to do `activity` ("saving name.safetensors", "rendering samples") until the
        next `on_step`; speed and ETA leave that time out."""

    def on_saved(self, path: Path, step: int, epoch: int) -> None:
        """A LoRA file was written."""

    def on_removed(self, path: Path) -> None:
        """A LoRA file saved earlier was deleted (`keep_last_n_saves`)."""

    def on_sample(self, step: int, images: list[Image.Image], prompts: list[str]) -> None:
        """Sample images were rendered with the LoRA as trained so far."""

    def on_validation(self, step: int, loss: float) -> None:
        """The validation loss was measured after `step` (0: before the first)."""

    def should_stop(self) -> bool:
        """Checked after every step: True ends the run (the weights so far are saved)."""
        return False

    def save_requested(self) -> bool:
        """Checked after every step: True saves the weights now and goes on."""
        return False

    def interrupt_requested(self) -> bool:
        """Checked at the end of every step: True saves the weights and state (`name-interrupted-s000123`)
        and raises KeyboardInterrupt, as a Ctrl-C during the step would, but at a step boundary, so that
        resuming continues exactly."""
        return False
