"""Console progress for CLI runs: a tqdm bar with loss and learning rate, plain lines for messages, and the
console's stop signals passed on to the loop."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from lora_trainer.interrupts import StopSignals
from lora_trainer.train.events import RunPlan, StepReport, TrainingEvents


class ConsoleEvents(TrainingEvents):
    """Prints the plan and saves, and drives a tqdm bar over the optimizer steps.

    Use it as a context manager: leaving the block closes the bar however the run ended (finished, stopped,
    interrupted or failed), so that the next line is not printed on the bar's line. With `signals`, a Ctrl-C or
    SIGTERM during training ends the run after the step in flight. Without `shown` (the other processes of a
    run that several train) it prints nothing but still passes the signals on.
    """

    def __init__(self, signals: StopSignals | None = None, shown: bool = True) -> None:
        self._bar: tqdm | None = None
        self._signals = signals
        self._shown = shown

    def __enter__(self) -> ConsoleEvents:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the bar, ending its line."""
        if self._bar is not None:
            self._bar.close()

    def on_message(self, text: str) -> None:
        if self._shown:
            tqdm.write(text)

    def on_caching(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(total=total, desc="Caching latents", unit="image", dynamic_ncols=True,
                             disable=not self._shown)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def on_start(self, plan: RunPlan) -> None:
        self.on_message(plan.summary)
        self._bar = tqdm(total=plan.total_steps, unit="step", dynamic_ncols=True, disable=not self._shown)
        if self._signals is not None:
            self._signals.deferring = True

    def on_step(self, report: StepReport) -> None:
        if self._bar is None:
            return
        self._bar.update(report.step - self._bar.n)
        if report.loss is not None:
            self._bar.set_postfix(loss=f"{report.loss:.4f}", lr=f"{report.learning_rate:.2e}", epoch=report.epoch)
        if report.step >= report.total_steps:
            self.close()

    def on_saved(self, path: Path, step: int, epoch: int) -> None:
        self.on_message(f"saved {path} (step {step}, epoch {epoch})")

    def interrupt_requested(self) -> bool:
        return self._signals is not None and self._signals.received is not None
