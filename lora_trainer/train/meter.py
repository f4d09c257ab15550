"""What a training loop reports after each optimizer step: the mean loss since the last report and the speed; and
whether the weights are still finite."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lora_trainer.errors import UserError
from lora_trainer.train.distributed import mean_over_processes
from lora_trainer.train.events import StepReport


class StepMeter:
    """Sums the loss on the device and reads it back only when a report is due (every `report_every` steps and at
    the last), which keeps the device busy; measures the speed between those reports, leaving out paused time."""

    def __init__(self, device: torch.device | str, first_step: int, total_steps: int, report_every: int,
                 samples_per_step: int, started_at: float, nan_advice: str):
        self.total_steps, self.report_every = total_steps, report_every
        self.samples_per_step, self.started_at, self.nan_advice = samples_per_step, started_at, nan_advice
        self._loss_sum = torch.zeros((), device=device)
        self._losses = 0
        self._window_start, self._window_step = time.perf_counter(), first_step
        self.seconds_per_step = 0.0
        """Measured between the last two reports that read the loss."""

    def add(self, loss: torch.Tensor) -> None:
        """Count one forward pass's loss."""
        self._loss_sum += loss.detach()
        self._losses += 1

    def report(self, accelerator: Any, step: int, epoch: int, learning_rate: float) -> StepReport:
        """The report after optimizer step `step` (in `epoch`, counted from 1). Its loss, the mean over every
        process since the last, is read when due (else None); a loss that is not finite is a `UserError`."""
        loss = None
        if step % self.report_every == 0 or step == self.total_steps:
            loss = mean_over_processes(accelerator, self._loss_sum / self._losses).item()
            if not math.isfinite(loss):
                raise UserError(f"the loss became {loss} by step {step}; nothing more was saved. {self.nan_advice}")
            self._loss_sum.zero_()
            self._losses = 0
            now = time.perf_counter()
            self.seconds_per_step = (now - self._window_start) / max(1, step - self._window_step)
            self._window_start, self._window_step = now, step
        steps_per_second = 1 / self.seconds_per_step if self.seconds_per_step else 0.0
        return StepReport(step=step, total_steps=self.total_steps, epoch=epoch, loss=loss,
                          learning_rate=learning_rate, steps_per_second=steps_per_second,
                          samples_per_second=steps_per_second * self.samples_per_step,
                          seconds_elapsed=time.time() - self.started_at,
                          seconds_left=self.seconds_per_step * (self.total_steps - step))

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time of the `with` block (saves, samples, evaluations) out of the speed."""
        paused_at = time.perf_counter()
        try:
            yield
        finally:
            self._window_start += time.perf_counter() - paused_at


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of `tensors` is finite, read back from the device once for all of them (a read per
    tensor would wait for the device hundreds of times per save)."""
    checks = [torch.isfinite(tensor).all() for tensor in tensors]
    return not checks or bool(torch.stack([check.to(checks[0].device) for check in checks]).all())
