"""The Test panel: a grid of LoRA strength x saved file (or seed) rendered through the host's own pipeline, as
one more job of the runner (the same queue, progress and Stop as training)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_trainer.caption.writer import read_caption
from lora_trainer.data.scan import image_files
from lora_trainer.errors import UserError
from lora_trainer.grid import DEFAULT_STRENGTHS, GridPlan, parse_seeds, parse_strengths
from lora_trainer.host import Host, list_loras
from lora_trainer.jobs import JobRunner, JobStatus
from lora_trainer.server.queue import JobQueue
from lora_trainer.server.specs import GridJob
from lora_trainer.tab.dataset import dataset_folder
from lora_trainer.tab.notices import notice
from lora_trainer.tab.queue import submit_job


def default_grid_prompt(trigger_word: str, folder: str | Path | None) -> str:
    """The trigger word and the first caption of the dataset in `folder` ("sks, a red bike"): the caption alone
    when it holds the trigger word already, the trigger word alone when no caption can be read."""
    trigger = trigger_word.strip()
    caption = _first_caption(folder)
    if not caption or (trigger and re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption)):
        return caption or trigger
    return f"{trigger}, {caption}" if trigger else caption


def _first_caption(folder: str | Path | None) -> str:
    try:
        images = image_files(dataset_folder(folder or ""))
    except UserError:
        return ""
    for image in images:
        try:
            caption = read_caption(image)
        except UnicodeDecodeError:
            continue
        if caption:
            return caption
    return ""


def lora_choices(host: Host) -> list[str]:
    """The LoRA files of the host's folder as the grid's file picker names them (relative paths), newest first."""
    return list(_lora_names(host).values())


def last_run_choices(host: Host, saved: list[Path]) -> list[str]:
    """The file picker's names for `saved` (the last run's files, in saving order) still in the host's folder."""
    names = _lora_names(host)
    return [names[path.resolve()] for path in map(Path, saved) if path.resolve() in names]


def _lora_names(host: Host) -> dict[Path, str]:
    lora_dir = Path(host.lora_dir()).resolve()
    return {path.resolve(): path.resolve().relative_to(lora_dir).as_posix() for path in list_loras(host)}


def grid_plan_from_form(host: Host, prompt: str, negative_prompt: str, files: list[str], strengths: str,
                        seeds: str, sampler_name: str, steps: Any, cfg_scale: Any, width: Any,
                        height: Any) -> GridPlan:
    """The grid the Test panel asks for: `files` are names from `lora_choices`, the rest widget values."""
    if not str(prompt or "").strip():
        raise UserError("Enter a prompt for the grid, e.g. the trigger word and a caption of the dataset.")
    if not files:
        raise UserError("Pick at least one LoRA file to compare.")
    lora_dir = Path(host.lora_dir()).resolve()
    loras = []
    for name in files:
        path = (lora_dir / name).resolve()
        if not (path.is_relative_to(lora_dir) and path.is_file()):
            raise UserError(f"There is no LoRA file {name!r} in {lora_dir}: refresh the list of files and pick "
                            "again.")
        loras.append(path)
    try:
        cfg = float(cfg_scale)
    except (TypeError, ValueError):
        cfg = math.nan
    if not math.isfinite(cfg) or cfg < 0:
        raise UserError(f"CFG scale {cfg_scale!r} is not usable: enter a number such as 7.")
    return GridPlan(prompt=prompt.strip(), loras=loras, strengths=parse_strengths(strengths),
                    seeds=parse_seeds(seeds), negative_prompt=(negative_prompt or "").strip(),
                    steps=_whole_number(steps, "Steps", 1), cfg_scale=cfg, width=_image_side(width, "Width"),
                    height=_image_side(height, "Height"), sampler_name=(sampler_name or "").strip())


def _whole_number(value: Any, label: str, minimum: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"{label} must be a whole number of at least {minimum}, not {value!r}.")
    return value


def _image_side(value: Any, label: str) -> int:
    side = _whole_number(value, label, 8)
    if side % 8:
        raise UserError(f"{label} must be a multiple of 8 pixels (e.g. 512), not {side}.")
    return side


def grid_cell_captions(plan: GridPlan) -> list[str]:
    """A caption per cell of `plan`'s grid, row by row: the row's file (or seed) and the column's strength."""
    return [f"{label}, strength {strength:g}" for *_, label in plan.rows() for strength in plan.strengths]


@dataclass
class GridPanel:
    """The Test panel's components, and `cell_captions`: the captions of the grid being rendered."""

    queue: JobQueue
    host: Host
    prompt: Any
    negative: Any
    files: Any
    refresh_button: Any
    strengths: Any
    seeds: Any
    sampler: Any
    steps: Any
    cfg: Any
    width: Any
    height: Any
    button: Any
    defaults_button: Any
    notice: Any
    image: Any
    cells: Any
    cell_captions: Any

    @property
    def runner(self) -> JobRunner:
        """The queue's runner: the running (or last) job's status, Stop and Save now."""
        return self.queue.runner

    @classmethod
    def build(cls, queue: JobQueue, host: Host) -> GridPanel:
        import gradio as gr

        txt2img = host.render_defaults()
        with gr.Accordion("Test: compare strengths and epochs in a grid", open=False, elem_id="lora_trainer_test"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt", lines=2, info="Default: the trigger word and a caption of "
                                        "the dataset", elem_id="lora_trainer_grid_prompt")
                    negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="lora_trainer_grid_negative")
                    with gr.Row():
                        files = gr.Dropdown(choices=lora_choices(host), value=[], multiselect=True,
                                            label="LoRA files: one row each", scale=5,
                                            info="Default: every file saved by the last run (the one with "
                                                 "the lowest validation loss, when it was measured)",
                                            elem_id="lora_trainer_grid_files")
                        refresh_button = gr.Button("Refresh", size="sm", scale=0, min_width=80,
                                                   elem_id="lora_trainer_grid_refresh")
                    with gr.Row():
                        strengths = gr.Textbox(DEFAULT_STRENGTHS, label="Strengths: one column each", max_lines=1,
                                               elem_id="lora_trainer_grid_strengths")
                        seeds = gr.Textbox("1", label="Seeds", max_lines=1, info="The same seed in every cell; "
                                           "several seeds (with one file) make the rows; -1: a random one",
                                           elem_id="lora_trainer_grid_seeds")
                with gr.Column(scale=2):
                    with gr.Row():
                        sampler = gr.Textbox(txt2img.sampler_name, label="Sampler", max_lines=1,
                                             info="As txt2img names it", elem_id="lora_trainer_grid_sampler")
                        steps = gr.Number(txt2img.steps, precision=0, label="Steps", elem_id="lora_trainer_grid_steps")
                        cfg = gr.Number(txt2img.cfg_scale, label="CFG scale", elem_id="lora_trainer_grid_cfg")
                    with gr.Row():
                        width = gr.Number(txt2img.width, precision=0, label="Width", elem_id="lora_trainer_grid_width")
                        height = gr.Number(txt2img.height, precision=0, label="Height",
                                           elem_id="lora_trainer_grid_height")
                    with gr.Row():
                        button = gr.Button("Render the grid", variant="primary", elem_id="lora_trainer_grid_button")
                        defaults_button = gr.Button("Defaults from the last run", elem_id="lora_trainer_grid_defaults")
                    panel_notice = gr.HTML(elem_id="lora_trainer_grid_notice")
            image = gr.Image(label="Grid (saved with its parameters in the WebUI's grids folder)", type="pil",
                             interactive=False, height=640, elem_id="lora_trainer_grid_image")
            cells = gr.Gallery(label="Cells: click one to see it large", columns=5, height=480,
                               elem_id="lora_trainer_grid_cells")
        return cls(queue, host, prompt, negative, files, refresh_button, strengths, seeds, sampler, steps, cfg,
                   width, height, button, defaults_button, panel_notice, image, cells, gr.State([]))

    @property
    def defaults_outputs(self) -> list:
        """What `defaults` updates."""
        return [self.prompt, self.files, self.sampler, self.steps, self.cfg, self.width, self.height]

    def defaults(self, trigger: str, folder_text: str) -> dict:
        """The form pre-filled from the last training run (its files, trigger word, dataset and resolution) and
        the host's txt2img settings."""
        import gradio as gr

        txt2img = self.host.render_defaults()
        status = self.runner.status()
        last_run = last_run_choices(self.host, status.saved)
        if status.best_saved is not None:  # the file with the lowest validation loss, when the run measured it
            last_run = last_run_choices(self.host, [status.best_saved]) or last_run
        # Without a last run (or after another job), the files picked so far stay picked.
        files = gr.update(choices=lora_choices(self.host), value=last_run) if last_run else \
            gr.update(choices=lora_choices(self.host))
        side = status.config.dataset.resolution if status.config is not None else None
        return {self.prompt: default_grid_prompt(trigger, folder_text), self.files: files,
                self.sampler: txt2img.sampler_name, self.steps: txt2img.steps, self.cfg: txt2img.cfg_scale,
                self.width: side or txt2img.width, self.height: side or txt2img.height}

    def wire(self, trigger_word: Any, folder: Any, progress) -> None:
        """Connect the panel's events; `progress` (the progress panel) shows the grid job."""
        import gradio as gr

        form = [self.prompt, self.negative, self.files, self.strengths, self.seeds, self.sampler, self.steps,
                self.cfg, self.width, self.height]

        def start(seen_now: dict | None, *values) -> dict:
            try:
                plan = grid_plan_from_form(self.host, *values)
                seeds = ", ".join(map(str, plan.seeds))
                submitted = submit_job(self.queue, GridJob(plan), progress, seen_now,
                                       f"Rendering {len(plan.rows())} x {len(plan.strengths)} images with seed "
                                       f"{seeds}: progress above, the grid below when it is done.")
            except UserError as error:
                return {self.notice: notice(str(error), error=True)}
            return {self.notice: submitted.pop("notice"), self.cell_captions: grid_cell_captions(plan), **submitted}

        def refresh_files() -> dict:
            return {self.files: gr.update(choices=lora_choices(self.host))}

        self.button.click(start, [progress.seen, *form], [self.notice, self.cell_captions, *progress.started_outputs])
        self.defaults_button.click(self.defaults, [trigger_word, folder], self.defaults_outputs)
        self.refresh_button.click(refresh_files, None, [self.files])

    @property
    def poll_outputs(self) -> list:
        """What `on_status` updates."""
        return [self.notice, self.image, self.cells, *self.defaults_outputs]

    def on_status(self, status: JobStatus, changed: bool, ended: str | None, captions: list[str], trigger: str,
                  folder_text: str) -> dict:
        """A poll's updates: the grid and its message once rendered; the defaults once a training run ended.
        (The button stays: while a job runs, it queues the grid behind it.)"""
        import gradio as gr

        updates: dict = {}
        if not changed:
            return updates
        if status.kind == "grid" and not status.running:
            updates[self.notice] = notice(status.message, error=status.state == "failed")
        if status.kind == "grid" and status.grid is not None:  # the last grid stays up until a new one is done
            cells = [cell for row in status.grid_cells for cell in row]
            labels = captions if len(captions) == len(cells) else [None] * len(cells)
            updates[self.image] = status.grid
            updates[self.cells] = gr.update(value=list(zip(cells, labels)), columns=len(status.grid_cells[0]))
        if ended == "training":
            updates.update(self.defaults(trigger, folder_text))
        return updates
