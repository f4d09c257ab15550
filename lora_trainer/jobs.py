"""Background jobs inside a host: one training or captioning run at a time, observable and stoppable.

The tab polls `JobRunner.status()`; the job thread holds the host's model (`Host.busy`) for the whole run,
so the host's own generation queue waits and its progress bar and Interrupt button work too.
"""

from __future__ import annotations

import json
import resource
import threading
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from lora_trainer.caption import CaptionOptions, caption_folder
from lora_trainer.config import TrainConfig
from lora_trainer.errors import UserError
from lora_trainer.files import atomic_write, atomic_write_text
from lora_trainer.grid import GridPlan, GridStopped, render_grid, save_png
from lora_trainer.host import Host, HostBusy, HostTask, RenderRequest
from lora_trainer.train.events import RunPlan, StepReport, TrainingEvents
from lora_trainer.train.loop import train

JobState = Literal["idle", "running", "finished", "stopped", "failed"]
SD_VERSION_LABEL = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
HOST_RETRY_SECONDS = 1.0
"""How often a job that waits for the host's model (busy with its own generation) tries again."""
STOPPING = "stopping"
"""The activity of a job asked to stop, until it has (a training run saves first)."""


@dataclass
class JobStatus:
    """A snapshot of the current (or last) job, safe to read from any thread."""

    kind: str = ""
    state: JobState = "idle"
    message: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, loss) of each validation measurement, when the run holds images out."""
    saved_validation_losses: dict[Path, float] = field(default_factory=dict)
    """The validation loss of each saved file's weights, where it was measured."""
    steps_per_second: float = 0.0
    samples_per_second: float = 0.0
    seconds_left: float = 0.0
    activity: str = ""
    """What a running training job does besides stepping ("saving name.safetensors"), or ""."""
    memory: str = ""
    samples: list[tuple[int, str, Image.Image]] = field(default_factory=list)
    """(step, prompt, image) of the sample images so far."""
    saved: list[Path] = field(default_factory=list)
    grid: Image.Image | None = None
    grid_cells: list[list[Image.Image]] = field(default_factory=list)
    grid_path: Path | None = None
    config: TrainConfig | None = None
    """The settings of the running or last training run (kept through later captioning and grid jobs)."""
    trigger_word: str = ""
    """That run's trigger word."""

    @property
    def running(self) -> bool:
        """Whether a job is in progress."""
        return self.state == "running"

    @property
    def best_saved(self) -> Path | None:
        """The saved file (still there) with the lowest validation loss, when validation losses were measured."""
        measured = [path for path in self.saved if path in self.saved_validation_losses]
        return min(measured, key=self.saved_validation_losses.__getitem__) if measured else None


_process_runner: JobRunner | None = None
_process_runner_lock = threading.Lock()


def process_runner(host: Host) -> JobRunner:
    """This process's one `JobRunner`, created on first use and kept when the host reloads its UI.

    While no job runs, the runner moves to `host` (a reloaded UI brings a new host object); a running job
    keeps its host, so the reloaded tab shows it.
    """
    global _process_runner
    with _process_runner_lock:
        if _process_runner is None:
            _process_runner = JobRunner(host)
        elif not _process_runner.status().running:
            _process_runner.host = host
        return _process_runner


class JobRunner:
    """Runs one job at a time in a background thread and keeps its status."""

    def __init__(self, host: Host):
        self.host = host
        self._lock = threading.Lock()
        self._status = JobStatus()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._save_now = threading.Event()
        self.on_change: Callable[[JobStatus], None] | None = None
        """Called (from the job's thread, with the status) after each saved file and when a job has ended: the
        queue persists what it needs and starts the next job."""

    def status(self) -> JobStatus:
        """A copy of the current status."""
        with self._lock:
            return replace(self._status, losses=list(self._status.losses), samples=list(self._status.samples),
                           saved=list(self._status.saved), validation_losses=list(self._status.validation_losses),
                           saved_validation_losses=dict(self._status.saved_validation_losses))

    def start_training(self, config: TrainConfig, trigger_word: str = "", preview_prompt: str = "") -> None:
        """Train `config` on the host's loaded model, saving into the host's LoRA folder.

        Each saved file gets `name.preview.png` (rendered with the LoRA as trained so far, from
        `preview_prompt`) and `name.json` (activation text = `trigger_word`), and is registered with the host.
        """
        config = config.updated(output_dir=Path(self.host.lora_dir()))
        self._start("training", lambda task: self._train(task, config, trigger_word, preview_prompt),
                    config=config, trigger_word=trigger_word)

    def start_captioning(self, folder: Path, options: CaptionOptions) -> None:
        """Caption the images of `folder` in place."""
        self._start("captioning", lambda task: self._caption(task, Path(folder), options))

    def start_grid(self, plan: GridPlan) -> None:
        """Render `plan` through the host's own pipeline and save it (with its parameters) in the grids folder."""
        self._start("grid", lambda task: self._grid(task, plan))

    def stop(self) -> None:
        """Ask the running job to stop (a training run saves what it has first). The host's own stop buttons
        work too (`HostTask.interrupted`, `HostTask.stop_requested`)."""
        self._stop.set()
        with self._lock:
            if self._status.running:
                self._status.activity = STOPPING

    def save_now(self) -> None:
        """Ask the running training job to save its weights at the next step and go on."""
        self._save_now.set()

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until the current job has ended (or `timeout` seconds passed); return the status."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.status()

    def _start(self, kind: str, work, **last_run) -> None:
        with self._lock:
            if self._status.running:
                raise UserError(f"a {self._status.kind} job is already running: stop it or wait for it to finish")
            # The last training run's files and settings stay through later captioning and grid jobs.
            if kind != "training":
                last_run = dict(saved=self._status.saved, config=self._status.config,
                                trigger_word=self._status.trigger_word)
            self._status = JobStatus(kind=kind, state="running", message=f"Starting {kind}...", **last_run)
        self._stop.clear()
        self._save_now.clear()
        self._thread = threading.Thread(target=self._run, args=(kind, work), name=f"lora-trainer-{kind}",
                                        daemon=True)
        self._thread.start()

    def _run(self, kind: str, work) -> None:
        try:
            with ExitStack() as held:
                task = self._wait_for_host(held, kind)
                final_state, message = ("stopped", f"Stopped before the {kind} started") if task is None \
                    else work(task)
        except UserError as error:
            final_state, message = "failed", str(error)
        except Exception as error:  # the thread must always end with a status the user can read
            traceback.print_exc()
            final_state, message = "failed", f"{type(error).__name__}: {error}"
        self._update(state=final_state, message=message, activity="")
        self._notify()

    def _notify(self) -> None:
        if self.on_change is not None:
            self.on_change(self.status())

    def _wait_for_host(self, held: ExitStack, kind: str) -> HostTask | None:
        """Hold the host's model for the job (in `held`), waiting while the host uses it (a generation the user
        started goes first); None when the job was asked to stop meanwhile."""
        while True:
            try:
                return held.enter_context(self.host.busy(f"LoRA trainer: {kind}"))
            except HostBusy:
                self._update(message=f"Waiting for the model: the host is busy; the {kind} starts when it is free")
                if self._stop.wait(HOST_RETRY_SECONDS):
                    return None

    def _should_stop(self, task: HostTask) -> bool:
        return self._stop.is_set() or task.interrupted() or task.stop_requested()

    def _update(self, **changes) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self._status, name, value)

    def _train(self, task: HostTask, config: TrainConfig, trigger_word: str, preview_prompt: str):
        backend = self.host.loaded_model_backend()
        defaults = self.host.render_defaults()
        preview = RenderRequest(prompt=preview_prompt, seed=config.sampling.sample_seed, steps=defaults.steps,
                                cfg_scale=defaults.cfg_scale, width=config.dataset.resolution,
                                height=config.dataset.resolution,
                                sampler_name=defaults.sampler_name) if preview_prompt else None
        result = train(config, backend, _JobEvents(self, task, trigger_word, preview, backend.family))
        if result.stopped and not result.saved:
            return "stopped", "Stopped before training began; nothing was saved"
        if result.stopped:
            return "stopped", f"Stopped at step {result.steps}; saved {result.saved[-1].name}"
        return "finished", f"Finished {result.steps} steps; saved {', '.join(p.name for p in result.saved)}"

    def _caption(self, task: HostTask, folder: Path, options: CaptionOptions):
        def progress(done: int, total: int, path: Path) -> None:
            task.update(done, total, f"Captioning {path.name}")
            self._update(step=done, total_steps=total, message=f"Captioned {done}/{total}: {path.name}")

        report = caption_folder(folder, options, progress=progress,
                                should_stop=lambda: self._should_stop(task))
        return ("stopped" if report.stopped else "finished"), report.summary()

    def _grid(self, task: HostTask, plan: GridPlan):
        def progress(done: int, total: int) -> None:
            task.update(done, total, f"LoRA grid: image {done}/{total}")
            self._update(step=done, total_steps=total, message=f"Rendered {done}/{total}")

        try:
            grid, cells = render_grid(plan, self.host.render, progress,
                                      should_stop=lambda: self._should_stop(task))
        except GridStopped as stopped:
            return "stopped", str(stopped)
        path = save_png(grid, Path(self.host.grids_dir()) / "lora-grid.png", plan.infotext())
        self._update(grid=grid, grid_cells=cells, grid_path=path)
        return "finished", f"Saved the grid to {path}"

    def _on_saved(self, path: Path, step: int, trigger_word: str, preview: RenderRequest | None,
                  family: str) -> None:
        if preview is not None:
            image = self.host.render(preview)
            atomic_write(path.with_name(f"{path.stem}.preview.png"), lambda tmp: image.save(tmp, format="PNG"))
        _write_user_metadata(path, trigger_word, family)
        self.host.register_lora(path)
        with self._lock:
            self._status.saved.append(path)
            self._status.message = f"Saved {path.name} at step {step}"
            measured = dict(self._status.validation_losses)
            if step in measured:
                self._status.saved_validation_losses[path] = measured[step]
        self._notify()

    def _on_removed(self, path: Path) -> None:
        for companion in (path.with_name(f"{path.stem}.preview.png"), path.with_suffix(".json")):
            companion.unlink(missing_ok=True)
        self.host.forget_lora(path)
        with self._lock:
            self._status.saved.remove(path)


class _JobEvents(TrainingEvents):
    """Feeds a training run's events into the job status and the host's progress bar."""

    def __init__(self, runner: JobRunner, task: HostTask, trigger_word: str, preview: RenderRequest | None,
                 family: str):
        self.runner, self.task = runner, task
        self.trigger_word, self.preview, self.family = trigger_word, preview, family

    def on_message(self, text: str) -> None:
        self.runner._update(message=text)

    def on_caching(self, done: int, total: int) -> None:
        self.runner._update(message=f"Caching latents: {done}/{total} images")
        self.task.update(done, total, f"Caching latents: {done}/{total} images")

    def on_start(self, plan: RunPlan) -> None:
        self.runner._update(total_steps=plan.total_steps, message=plan.summary)

    def on_step(self, report: StepReport) -> None:
        with self.runner._lock:
            status = self.runner._status
            status.step, status.total_steps, status.epoch = report.step, report.total_steps, report.epoch
            status.steps_per_second, status.samples_per_second = report.steps_per_second, report.samples_per_second
            status.seconds_left = report.seconds_left
            stopping = self.should_stop()  # the tab's Stop or the host's Interrupt: this step is the last
            status.activity = STOPPING if stopping else ""
            status.memory = _memory_in_use()
            if report.loss is not None:
                status.losses.append((report.step, report.loss))
        loss = f", loss {report.loss:.4f}" if report.loss is not None else ""
        self.task.update(report.step, report.total_steps, f"Training LoRA: step {report.step}/{report.total_steps}"
                         f", epoch {report.epoch}{loss}")

    def on_busy(self, activity: str) -> None:
        self.runner._update(activity=activity)

    def on_validation(self, step: int, loss: float) -> None:
        with self.runner._lock:
            self.runner._status.validation_losses.append((step, loss))

    def on_saved(self, path: Path, step: int, epoch: int) -> None:
        self.runner._on_saved(path, step, self.trigger_word, self.preview, self.family)

    def on_removed(self, path: Path) -> None:
        self.runner._on_removed(path)

    def on_sample(self, step: int, images: list[Image.Image], prompts: list[str]) -> None:
        with self.runner._lock:
            self.runner._status.samples.extend((step, prompt, image) for prompt, image in zip(prompts, images))
        if images:
            self.task.update(step, self.runner._status.total_steps, f"Sample at step {step}", images[-1])

    def should_stop(self) -> bool:
        return self.runner._should_stop(self.task)

    def save_requested(self) -> bool:
        if self.runner._save_now.is_set():
            self.runner._save_now.clear()
            return True
        return False


def _write_user_metadata(lora_path: Path, trigger_word: str, family: str) -> None:
    """The WebUI's per-LoRA user metadata (`name.json`): activation text, preferred weight, model family."""
    metadata = {"description": "Trained with sd-webui-lora-trainer", "sd version": SD_VERSION_LABEL[family],
                "activation text": trigger_word, "preferred weight": 0.8, "negative text": "", "notes": ""}
    atomic_write_text(lora_path.with_suffix(".json"), json.dumps(metadata, indent=2))


def _memory_in_use() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak VRAM"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB peak RAM"

