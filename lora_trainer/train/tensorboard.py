"""TensorBoard logging of every run (loss, validation loss, learning rate, speed), when TensorBoard is installed."""

from __future__ import annotations

import time
from pathlib import Path

from lora_trainer.train.events import StepReport


class RunLog:
    """Scalars of one run under `logging_dir/<output_name>-<timestamp>`; a no-op when logging is off."""

    def __init__(self, logging_dir: Path | None, run_name: str):
        self.folder: Path | None = None
        self._writer = None
        if logging_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("TensorBoard is not installed: this run is not logged (pip install tensorboard)")
            return
        self.folder = Path(logging_dir) / f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self._writer = SummaryWriter(str(self.folder))

    def log_step(self, report: StepReport) -> None:
        """Write the report's scalars at its step."""
        if self._writer is None:
            return
        if report.loss is not None:
            self._writer.add_scalar("loss/train", report.loss, report.step)
        self._writer.add_scalar("lr", report.learning_rate, report.step)
        self._writer.add_scalar("speed/steps_per_second", report.steps_per_second, report.step)
        self._writer.add_scalar("speed/samples_per_second", report.samples_per_second, report.step)

    def log_validation(self, step: int, loss: float) -> None:
        """Write a validation loss at its step, beside the training loss."""
        if self._writer is not None:
            self._writer.add_scalar("loss/validation", loss, step)

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
