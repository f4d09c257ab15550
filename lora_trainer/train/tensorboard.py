"""TensorBoard logging of every run (loss, validation loss, learning rates, gradient norm, speed, sample
images, the config), when TensorBoard is installed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

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

    def log_step(self, report: StepReport, scalars: dict[str, float] | None = None) -> None:
        """Write the report's scalars at its step, and `scalars` by their tags (`lr/unet`, `gradient_norm`, ...)."""
        if self._writer is None:
            return
        if report.loss is not None:
            self._writer.add_scalar("loss/train", report.loss, report.step)
        self._writer.add_scalar("lr", report.learning_rate, report.step)
        for tag, value in (scalars or {}).items():
            self._writer.add_scalar(tag, value, report.step)
        self._writer.add_scalar("speed/steps_per_second", report.steps_per_second, report.step)
        self._writer.add_scalar("speed/samples_per_second", report.samples_per_second, report.step)

    def log_validation(self, step: int, loss: float) -> None:
        """Write a validation loss at its step, beside the training loss."""
        if self._writer is not None:
            self._writer.add_scalar("loss/validation", loss, step)

    def log_text(self, tag: str, text: str) -> None:
        """Write `text` as preformatted text (TensorBoard's text tab reads Markdown)."""
        if self._writer is not None:
            self._writer.add_text(tag, "    " + text.replace("\n", "\n    "), 0)

    def log_images(self, tag: str, images: list[Image.Image], step: int) -> None:
        """Write each image as `tag/00`, `tag/01`, ... at `step`."""
        if self._writer is None:
            return
        for index, image in enumerate(images):
            self._writer.add_image(f"{tag}/{index:02d}", np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
