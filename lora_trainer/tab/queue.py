"""The queue panel: the job queue the tab shares with the HTTP API (the running job, those waiting behind it and
the last ended ones), cancelling a queued job, and how the panels' start buttons submit to it."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from lora_trainer.errors import UserError
from lora_trainer.server.queue import JobQueue, QueuedJob
from lora_trainer.server.specs import JobSpec
from lora_trainer.tab.notices import notice

ENDED_SHOWN = 5
"""Ended jobs listed under the running and queued ones."""
CHOICE_SEPARATOR = " · "


def queue_html(jobs: list[QueuedJob]) -> str:
    """A table of the last ended jobs, the running one and the queued ones in the order they will run."""
    ended = [job for job in jobs if job.ended][-ENDED_SHOWN:]
    shown = ended + [job for job in jobs if not job.ended]
    if not shown:
        return '<div class="lora-trainer-queue">No jobs yet. Start buttons and the HTTP API add jobs here.</div>'
    rows = "".join(f'<tr class="lora-trainer-queue-{job.state}"><td><code>{html.escape(job.id)}</code></td>'
                   f"<td>{html.escape(job.kind)}</td><td>{html.escape(job.name)}</td>"
                   f"<td>{html.escape(job.state)}</td><td>{html.escape(_last_saved(job))}</td></tr>"
                   for job in shown)
    return ('<div class="lora-trainer-queue"><table><thead><tr><th>Job</th><th>Kind</th><th>Name</th>'
            f"<th>State</th><th>Last saved</th></tr></thead><tbody>{rows}</tbody></table></div>")


def _last_saved(job: QueuedJob) -> str:
    """The file a training job saved last (what an interrupted or stopped run leaves to resume from), or ""."""
    return PurePath(job.saved[-1]).name if job.saved else ""


def queued_choices(jobs: list[QueuedJob]) -> list[str]:
    """The queued jobs as the cancel menu names them: "id · kind · name"."""
    return [CHOICE_SEPARATOR.join((job.id, job.kind, job.name)) for job in jobs if job.state == "queued"]


def submit_job(queue: JobQueue, spec: JobSpec, progress, seen_now: dict | None, started: str) -> dict:
    """Submit `spec` from a panel: the notice (`started` when it runs at once, its place otherwise) under the key
    "notice", and, when it runs at once, the progress panel's updates for a started job."""
    job = queue.submit(spec)
    if job.state == "failed":
        return {"notice": notice(job.message, error=True)}
    place = queue.place(job.id)
    if place == 0:
        return {"notice": notice(started), **progress.started(seen_now)}
    ahead = "the running job" if place == 1 else f"the running job and {place - 1} queued"
    return {"notice": notice(f"Queued as job {job.id}: it starts after {ahead}.")}


@dataclass
class QueuePanel:
    """The queue table, the menu of queued jobs and the Cancel button; `shown`, the choices this page shows."""

    queue: JobQueue
    table: Any
    choice: Any
    cancel_button: Any
    notice: Any
    shown: Any

    @classmethod
    def build(cls, queue: JobQueue) -> QueuePanel:
        import gradio as gr

        jobs = queue.jobs()
        with gr.Accordion("Job queue", open=True, elem_id="lora_trainer_queue_panel"):
            table = gr.HTML(queue_html(jobs), elem_id="lora_trainer_queue")
            with gr.Row():
                choice = gr.Dropdown(queued_choices(jobs), label="Queued job", elem_id="lora_trainer_queue_choice")
                cancel_button = gr.Button("Cancel the queued job", elem_id="lora_trainer_queue_cancel")
            panel_notice = gr.HTML(elem_id="lora_trainer_queue_notice")
        return cls(queue, table, choice, cancel_button, panel_notice, gr.State(queued_choices(jobs)))

    def wire(self) -> None:
        """Connect the Cancel button."""
        import gradio as gr

        def cancel(chosen: str | None) -> dict:
            if not chosen:
                return {self.notice: notice("Pick a queued job to cancel.", error=True)}
            job_id = chosen.split(CHOICE_SEPARATOR)[0]
            try:
                if self.queue.job(job_id).state != "queued":
                    raise UserError(f"Job {job_id} is no longer queued: stop it with Stop while it runs.")
                job = self.queue.cancel(job_id)
            except UserError as error:
                return {self.notice: notice(str(error), error=True)}
            jobs = self.queue.jobs()
            choices = queued_choices(jobs)
            return {self.notice: notice(f"Cancelled job {job.id} ({job.kind} {job.name})."),
                    self.table: queue_html(jobs), self.choice: gr.update(choices=choices, value=None),
                    self.shown: choices}

        self.cancel_button.click(cancel, [self.choice], [self.notice, self.table, self.choice, self.shown])

    @property
    def poll_inputs(self) -> list:
        """What `on_poll` reads."""
        return [self.choice, self.shown]

    @property
    def poll_outputs(self) -> list:
        """What `on_poll` updates."""
        return [self.table, self.choice, self.shown]

    def on_poll(self, chosen: str | None, shown: list[str] | None) -> dict:
        """A poll's updates: the table, and the menu's choices when they changed (the choice goes once that job
        left the queue); an open menu is left alone otherwise."""
        import gradio as gr

        jobs = self.queue.jobs()
        updates: dict = {self.table: queue_html(jobs)}
        choices = queued_choices(jobs)
        if choices != shown:
            updates[self.choice] = gr.update(choices=choices, value=chosen if chosen in choices else None)
            updates[self.shown] = choices
        return updates
