"""The Train LoRA tab: a dataset with editable captions, settings and presets, a job's live status, a test grid.

Written against `Host` only: the WebUI skin calls `build_tab(A1111Host())`, the tests call it with a fake.
Each panel is one module with its components and logic (`dataset`, `captioning`, `training`, `progress`,
`grids` for the Test panel, `queue` for the job queue); `form` and `presets` are the settings without gradio.
The jobs live in the `JobQueue` (shared with the HTTP API) and its `JobRunner`, not in the page, so a reloaded
page shows the run still going and the settings it runs with.
`javascript/lora_trainer.js` clicks the hidden poll button, draws the loss chart and refreshes the WebUI's
Lora cards after a save.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lora_trainer.host import Host
from lora_trainer.jobs import JobRunner
from lora_trainer.server.queue import JobQueue
from lora_trainer.tab.captioning import CaptioningPanel
from lora_trainer.tab.dataset import DatasetPanel, prepare_default_folder
from lora_trainer.tab.form import default_config, field_widget, form_fields, form_values
from lora_trainer.tab.grids import GridPanel
from lora_trainer.tab.presets import preset_names
from lora_trainer.tab.progress import ProgressPanel, ended_job
from lora_trainer.tab.queue import QueuePanel
from lora_trainer.tab.training import TrainingPanel, model_note

if TYPE_CHECKING:
    import gradio as gr


def build_tab(host: Host, queue: JobQueue | None = None, presets_dir: Path | None = None) -> gr.Blocks:
    """The whole Train LoRA tab as a `gr.Blocks` (gradio 3.41 and 4), submitting jobs to `queue` on `host`.

    The host should pass one long-lived `queue` (`process_queue`): a page (or a rebuilt UI) then finds the
    running job, and the HTTP API sees the same queue. Without one, the tab starts a queue of its own.
    Presets go to `presets_dir`, by default `lora_trainer_presets` beside the host's LoRA folder.
    """
    import gradio as gr

    if queue is None:
        queue = JobQueue(JobRunner(host), Path(host.queue_dir()))
        queue.start()
    runner = queue.runner
    presets_dir = Path(presets_dir or Path(host.lora_dir()).parent / "lora_trainer_presets")
    prepare_default_folder(host.datasets_dir())
    initial = form_values(default_config(host.model_family()).updated(train_data_dir=host.datasets_dir()))
    folder_field = next(field for field in form_fields() if field.name == "train_data_dir")
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Column(elem_id="lora_trainer_tab"):
            model_note_box = gr.HTML(elem_id="lora_trainer_model_note")
            with gr.Row():
                with gr.Column():
                    gr.Markdown("### Dataset")
                    dataset = DatasetPanel.build(field_widget(folder_field, initial["train_data_dir"]))
                    captioning = CaptioningPanel.build()
                with gr.Column():
                    training = TrainingPanel.build(queue, host, presets_dir, initial, dataset.folder)
            progress = ProgressPanel.build(runner, host)
            queue_panel = QueuePanel.build(queue)
            grids = GridPanel.build(queue, host)

        dataset.wire(training.fields["mask_dir"])
        queue_panel.wire()
        captioning.wire(queue, dataset.folder, progress)
        training.wire(progress, model_note_box, dataset.reload_after)
        grids.wire(training.trigger_word, dataset.folder, progress)

        def poll(seen_before: dict | None, folder_text: str, trigger: str, captions: list[str],
                 queue_choice: str | None, queue_shown: list[str] | None) -> dict:
            status = runner.status()
            ended = ended_job(seen_before, status)
            updates, changed = progress.on_status(status, seen_before)
            updates.update(queue_panel.on_poll(queue_choice, queue_shown))
            updates.update(training.on_status(status, ended))
            updates.update(captioning.on_status(status, ended))
            updates.update(grids.on_status(status, changed, ended, captions, trigger, folder_text))
            if ended == "captioning":
                updates.update(dataset.view(folder_text))
            return updates

        def page_load() -> dict:
            # The settings first: the dataset view and the Test panel's defaults read the restored folder.
            restored = training.restored()
            folder_text = restored.get(dataset.folder, initial["train_data_dir"])
            trigger = restored.get(training.trigger_word, "")
            prepare_default_folder(host.datasets_dir())
            return {**restored, **dataset.view(folder_text), model_note_box: model_note(host.model_family()),
                    training.preset_choice: gr.update(choices=preset_names(presets_dir)),
                    **grids.defaults(trigger, folder_text)}

        # Clicked by javascript/lora_trainer.js about once a second. A `load(every=...)` event would hold a
        # queue worker per open page for as long as the page is open.
        progress.poll_button.click(
            poll, [progress.seen, dataset.folder, training.trigger_word, grids.cell_captions, *queue_panel.poll_inputs],
            [progress.status_box, progress.chart_data, progress.saved_box, progress.samples, progress.seen,
             *queue_panel.poll_outputs,
             *training.poll_outputs, captioning.notice, *grids.poll_outputs,
             *dataset.view_outputs], queue=False, show_progress="hidden")
        tab.load(page_load, None, [*training.restored_outputs, *dataset.view_outputs, model_note_box,
                                   training.preset_choice, *grids.defaults_outputs], queue=False)
    return tab
