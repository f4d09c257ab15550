"""The Training panel: the settings form (common settings up front, the rest under Advanced in the config's
groups), presets, and Start / Save now / Stop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_trainer.config import GROUP_TITLES, TrainConfig
from lora_trainer.errors import UserError
from lora_trainer.host import Host
from lora_trainer.jobs import JobRunner, JobStatus
from lora_trainer.models.base import ModelFamily
from lora_trainer.server.queue import JobQueue
from lora_trainer.server.specs import TrainJob
from lora_trainer.tab.form import (
    FAMILY_LABEL,
    FAMILY_RESOLUTION,
    MAIN_KEYS,
    config_from_form,
    default_config,
    field_widget,
    form_fields,
    form_values,
)
from lora_trainer.tab.notices import notice
from lora_trainer.tab.presets import load_preset, preset_names, save_preset
from lora_trainer.tab.queue import submit_job
from lora_trainer.train.memory import plan_run_memory

MAIN_ROWS = (("network_type",), ("resolution", "lora_rank", "lora_alpha"), ("unet_lr", "epochs", "batch_size"),
             ("max_train_steps", "save_every_n_epochs", "keep_last_n_saves"), ("sample_prompts",),
             ("sample_every_n_steps", "mixed_precision", "cache_latents"))


def model_note(family: ModelFamily | None) -> str:
    """What the tab says about the loaded model and the defaults it brings."""
    if family is None:
        return notice("No model is loaded: load a checkpoint in the WebUI before training.", error=True)
    return notice(f"Loaded model: {FAMILY_LABEL[family]}. Defaults: {FAMILY_RESOLUTION[family]} px, rank 16, "
                  "alpha 8, UNet learning rate 1e-4, 10 epochs.")


def memory_estimate_note(host: Host, config: TrainConfig) -> str:
    """The memory plan of training `config` on the loaded model, as the panel's notice: the estimated peak, what
    the GPU has free and, when it does not fit, the setting that brings it under."""
    try:
        with host.busy("LoRA trainer: memory estimate"):
            plan = plan_run_memory(config, host.loaded_model_backend())
    except UserError as error:
        return notice(str(error), error=True)
    return notice(plan.line(), error=not plan.fits)


def advanced_groups() -> dict[str, list[str]]:
    """The settings under Advanced, by the config's groups, in the config's order."""
    groups: dict[str, list[str]] = {}
    for field in form_fields():
        if field.name not in (*MAIN_KEYS, "train_data_dir"):
            groups.setdefault(field.group, []).append(field.name)
    return groups


@dataclass
class TrainingPanel:
    """The panel's components; `fields` maps every form key (the dataset folder too) to its widget."""

    queue: JobQueue
    host: Host
    presets_dir: Path
    fields: dict[str, Any]
    trigger_word: Any
    preset_choice: Any
    load_preset_button: Any
    preset_name: Any
    overwrite_preset: Any
    save_preset_button: Any
    start_button: Any
    save_now_button: Any
    stop_button: Any
    defaults_button: Any
    notice: Any
    estimate_button: Any

    @property
    def runner(self) -> JobRunner:
        """The queue's runner: the running (or last) job's status, Stop and Save now."""
        return self.queue.runner

    @classmethod
    def build(cls, queue: JobQueue, host: Host, presets_dir: Path, initial: dict[str, Any],
              folder: Any) -> TrainingPanel:
        """Lay the panel out; `initial` holds the form's first values, `folder` is the dataset folder widget."""
        import gradio as gr

        by_name = {field.name: field for field in form_fields()}
        fields = {"train_data_dir": folder}

        def place(name: str) -> None:
            fields[name] = field_widget(by_name[name], initial[name])

        gr.Markdown("### Training")
        with gr.Row():
            place("output_name")
            trigger_word = gr.Textbox(label="Trigger word", info="Saved as the LoRA's activation text",
                                      elem_id="lora_trainer_trigger_word")
        for row in MAIN_ROWS:
            with gr.Row():
                for name in row:
                    place(name)
        with gr.Accordion("Advanced", open=False, elem_id="lora_trainer_advanced"):
            for group, names in advanced_groups().items():
                with gr.Accordion(GROUP_TITLES[group], open=False, elem_id=f"lora_trainer_advanced_{group}"):
                    for row in _rows_of_three(names, alone={"subsets"}):
                        with gr.Row():
                            for name in row:
                                place(name)
        with gr.Accordion("Presets", open=False, elem_id="lora_trainer_presets"):
            with gr.Row():
                preset_choice = gr.Dropdown(choices=preset_names(presets_dir), label="Preset",
                                            elem_id="lora_trainer_preset_choice")
                load_preset_button = gr.Button("Load preset", elem_id="lora_trainer_load_preset")
            with gr.Row():
                preset_name = gr.Textbox(label="Save as", elem_id="lora_trainer_preset_name")
                overwrite_preset = gr.Checkbox(label="Overwrite", value=False, elem_id="lora_trainer_preset_overwrite")
                save_preset_button = gr.Button("Save preset", elem_id="lora_trainer_save_preset")
        with gr.Row():
            start_button = gr.Button("Start", variant="primary", elem_id="lora_trainer_start")
            save_now_button = gr.Button("Save now", interactive=False, elem_id="lora_trainer_save_now")
            stop_button = gr.Button("Stop", variant="stop", interactive=False, elem_id="lora_trainer_stop")
            estimate_button = gr.Button("Estimate VRAM", elem_id="lora_trainer_estimate_memory")
        defaults_button = gr.Button("Defaults for the loaded model", size="sm", elem_id="lora_trainer_defaults")
        panel_notice = gr.HTML(elem_id="lora_trainer_notice")
        return cls(queue, host, presets_dir, fields, trigger_word, preset_choice, load_preset_button, preset_name,
                   overwrite_preset, save_preset_button, start_button, save_now_button, stop_button, defaults_button,
                   panel_notice, estimate_button)

    @property
    def form(self) -> list:
        """The form's widgets, in `form_fields` order."""
        return [self.fields[field.name] for field in form_fields()]

    def config(self, values: tuple) -> TrainConfig:
        """The config the form's `values` (in `form` order) describe, saving into the host's LoRA folder."""
        values_by_name = {field.name: value for field, value in zip(form_fields(), values, strict=True)}
        return config_from_form(values_by_name).updated(output_dir=Path(self.host.lora_dir()))

    def form_updates(self, config: TrainConfig, keep_dataset: bool = False) -> dict:
        """The form showing `config` (with `keep_dataset`, the dataset folder as it is)."""
        values = form_values(config)
        return {self.fields[name]: value for name, value in values.items()
                if not (keep_dataset and name == "train_data_dir")}

    def restored(self) -> dict:
        """For a page (re)load: the running or last training job's settings and trigger word, so that the page
        shows what trains and Start does not silently train the defaults; without one, the model's resolution."""
        status = self.runner.status()
        if status.config is None:
            return {self.fields["resolution"]: FAMILY_RESOLUTION[self.host.model_family() or "sd1"]}
        return {**self.form_updates(status.config), self.trigger_word: status.trigger_word}

    @property
    def restored_outputs(self) -> list:
        """What `restored` may update."""
        return [*self.form, self.trigger_word]

    def wire(self, progress, model_note_box: Any, reload_dataset) -> None:
        """Connect the panel's events. `progress` shows the job; `reload_dataset(event)` reloads the gallery
        after `event` (a preset names another folder)."""
        import gradio as gr

        def start(seen_now: dict | None, trigger: str, *values) -> dict:
            try:
                config = self.config(values)
                if config.dataset.train_data_dir is None:
                    raise UserError("Enter the dataset folder first.")
                prompts = config.sampling.sample_prompts
                preview_prompt = prompts[0] if prompts else trigger.strip()
                submitted = submit_job(self.queue, TrainJob(config, trigger.strip(), preview_prompt), progress,
                                       seen_now, f"Training {config.saving.output_name} started.")
            except UserError as error:
                return {self.notice: notice(str(error), error=True)}
            return {self.notice: submitted.pop("notice"), **submitted}

        def estimate(*values) -> dict:
            try:
                config = self.config(values)
            except UserError as error:
                return {self.notice: notice(str(error), error=True)}
            return {self.notice: memory_estimate_note(self.host, config)}

        def save_now() -> dict:
            self.runner.save_now()
            return {self.notice: notice("Saving at the next step.")}

        def stop() -> dict:
            self.runner.stop()
            return {self.notice: notice(stop_notice(self.runner.status()))}

        def save_current_preset(name: str, overwrite: bool, *values) -> dict:
            try:
                path = save_preset(self.presets_dir, name, self.config(values), overwrite)
            except UserError as error:
                return {self.notice: notice(str(error), error=True)}
            return {self.notice: notice(f"Saved preset {path}."),
                    self.preset_choice: gr.update(choices=preset_names(self.presets_dir), value=path.stem)}

        def load_chosen_preset(name: str) -> dict:
            try:
                loaded = load_preset(self.presets_dir, name)
            except UserError as error:
                return {self.notice: notice(str(error), error=True)}
            return {self.notice: notice(f"Loaded preset {name}."), **self.form_updates(loaded)}

        def model_defaults() -> dict:
            family = self.host.model_family()
            return {model_note_box: model_note(family),
                    **self.form_updates(default_config(family), keep_dataset=True)}

        self.start_button.click(start, [progress.seen, self.trigger_word, *self.form],
                                [self.notice, *progress.started_outputs])
        self.estimate_button.click(estimate, self.form, [self.notice])
        self.save_now_button.click(save_now, None, [self.notice])
        self.stop_button.click(stop, None, [self.notice])
        self.save_preset_button.click(save_current_preset, [self.preset_name, self.overwrite_preset, *self.form],
                                      [self.notice, self.preset_choice])
        reload_dataset(self.load_preset_button.click(load_chosen_preset, [self.preset_choice],
                                                     [self.notice, *self.form]))
        self.defaults_button.click(model_defaults, None, [model_note_box, *self.form])

    @property
    def poll_outputs(self) -> list:
        """What `on_status` updates."""
        return [self.save_now_button, self.stop_button, self.notice]

    def on_status(self, status: JobStatus, ended: str | None) -> dict:
        """A poll's updates: which buttons work now; the start notice goes once the run has ended (the status
        says how)."""
        import gradio as gr

        updates = {self.save_now_button: gr.update(interactive=status.running and status.kind == "training"),
                   self.stop_button: gr.update(interactive=status.running)}
        if ended == "training":
            updates[self.notice] = ""
        return updates


def _rows_of_three(names: list[str], alone: set[str]) -> list[list[str]]:
    """`names` in rows of up to three, each name in `alone` on a row of its own."""
    rows: list[list[str]] = []
    for name in names:
        if name in alone or not rows or len(rows[-1]) == 3 or rows[-1][0] in alone:
            rows.append([name])
        else:
            rows[-1].append(name)
    return rows


def stop_notice(status: JobStatus) -> str:
    """What Stop does to the job `status` describes, as the notice under the buttons says it."""
    if status.kind != "training":
        return f"Stopping the {status.kind}."
    if status.step == 0:
        return "Stopping before training begins (class images, caches): nothing will be saved."
    return "Stopping: the weights so far are saved first."
