"""The progress panel: the current job's state, progress bar, speed, ETA, memory and message, the loss chart's
data, the saved files and the sample images. It also holds the page's poll: what this page last saw of the job.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Any

from lora_trainer.host import Host
from lora_trainer.jobs import JobRunner, JobStatus

CHART_POINTS = 400
"""At most this many loss points go to the page; longer runs are averaged into this many."""
SAMPLES_SHOWN = 12


def chart_points(losses: list[tuple[int, float]], limit: int = CHART_POINTS) -> list[tuple[int, float]]:
    """`losses` as at most `limit` (step, loss) points: consecutive runs averaged, each at its last step."""
    if len(losses) <= limit:
        return list(losses)
    size = -(-len(losses) // limit)
    chunks = [losses[start:start + size] for start in range(0, len(losses), size)]
    return [(chunk[-1][0], sum(loss for _, loss in chunk) / len(chunk)) for chunk in chunks]


def chart_json(status: JobStatus, refresh_lora_cards: bool) -> str:
    """What the page's script needs: the loss points (training, and validation with its best step), the saved
    file names, the job state, whether it may refresh the host's Lora cards when a file is saved, and why the
    host's generations wait (`queue_note`)."""
    best = min(status.validation_losses, key=lambda point: point[1])[0] if status.validation_losses else None
    return json.dumps({"losses": chart_points(status.losses), "validation": status.validation_losses,
                       "best_step": best, "saved": [path.name for path in status.saved],
                       "state": status.state, "refresh_lora_cards": refresh_lora_cards,
                       "queue_note": queue_note(status)})


def queue_note(status: JobStatus) -> str:
    """Why a generation queued in the host waits while this job runs (it holds the host's queue), or "".

    The page adds it to the host's "In queue" progress text, one short line.
    """
    if not status.running:
        return ""
    doing = {"training": "LoRA training", "captioning": "LoRA trainer captioning", "grid": "LoRA test grid"}
    note = f"waiting for {doing.get(status.kind, status.kind)}"
    if status.total_steps:
        unit = "step " if status.kind == "training" else ""
        note += f" ({unit}{status.step}/{status.total_steps}"
        if status.kind == "training" and status.seconds_left and not status.activity:
            note += f", ETA {format_duration(status.seconds_left)}"
        note += ")"
    return note


def status_html(status: JobStatus) -> str:
    """The job's state (and what it is doing besides stepping), progress bar, speed, ETA, memory and latest
    message, as HTML. A failed job shows no progress: the message says what went wrong."""
    if status.state == "idle":
        return ('<div class="lora-trainer-status">No job has run since the WebUI started (the Job queue lists the '
                'jobs of earlier sessions).</div>')
    title = f"{status.kind.capitalize()}: {status.state}"
    if status.running and status.activity:
        title += f" · {status.activity}"
    lines = [f'<div class="lora-trainer-status-title">{html.escape(title)}</div>']
    if status.total_steps and status.state != "failed":
        percent = min(100.0, 100.0 * status.step / status.total_steps)
        lines.append(f'<div class="lora-trainer-bar"><div style="width: {percent:.1f}%"></div></div>')
        lines.append(f'<div class="lora-trainer-details">{html.escape(" · ".join(_progress_details(status)))}</div>')
    if status.message:
        css_class = "lora-trainer-message lora-trainer-error" if status.state == "failed" else "lora-trainer-message"
        text = "<br>".join(html.escape(line) for line in status.message.splitlines())
        lines.append(f'<div class="{css_class}">{text}</div>')
    return f'<div class="lora-trainer-status lora-trainer-{status.state}">{"".join(lines)}</div>'


def _progress_details(status: JobStatus) -> list[str]:
    if status.kind != "training":
        return [f"{status.step}/{status.total_steps}"]
    details = [f"Step {status.step}/{status.total_steps}", f"epoch {status.epoch}"]
    if status.losses:
        details.append(f"loss {status.losses[-1][1]:.4f}")
    if status.validation_losses:
        step, loss = min(status.validation_losses, key=lambda point: point[1])
        details.append(f"validation loss {status.validation_losses[-1][1]:.4f} (lowest {loss:.4f} at step {step})")
    if status.steps_per_second:
        details.append(f"{status.steps_per_second:.2f} it/s, {status.samples_per_second:.1f} samples/s")
    if status.running and status.seconds_left and not status.activity:
        details.append(f"ETA {format_duration(status.seconds_left)}")
    if status.memory:
        details.append(status.memory)
    return details


def format_duration(seconds: float) -> str:
    """"m:ss", or "h:mm:ss" from an hour on."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def saved_html(status: JobStatus, cards_refreshed: bool) -> str:
    """The files the job saved, newest last; when the page cannot refresh the Lora cards, how to see them."""
    if not status.saved:
        return '<div class="lora-trainer-saved">No file saved yet.</div>'
    best = status.best_saved
    items = "".join(f'<li><code>{html.escape(path.name)}</code> <span>{html.escape(str(path.parent))}</span>'
                    + (f' <strong>lowest validation loss ({status.saved_validation_losses[path]:.4f})</strong>'
                       if path == best else "") + "</li>"
                    for path in status.saved)
    note = "" if cards_refreshed else (
        "<p>They work in prompts now. Their cards appear after the Lora tab's Refresh, which also selects the "
        "--ckpt checkpoint again (a WebUI quirk): the tab does not press it for you.</p>")
    return f'<div class="lora-trainer-saved">Saved:<ul>{items}</ul>{note}</div>'


def ended_job(seen_before: dict | None, status: JobStatus) -> str | None:
    """The kind of job this page saw running and that has ended since its last poll, if any."""
    if seen_before is not None and seen_before.get("state") == "running" and not status.running:
        return seen_before.get("kind")
    return None


@dataclass
class ProgressPanel:
    """The panel's components, and `seen`: what the page's last poll saw of the job."""

    runner: JobRunner
    host: Host
    status_box: Any
    saved_box: Any
    samples: Any
    chart_data: Any
    poll_button: Any
    seen: Any

    @classmethod
    def build(cls, runner: JobRunner, host: Host) -> ProgressPanel:
        import gradio as gr

        with gr.Row():
            with gr.Column():
                status_box = gr.HTML(status_html(JobStatus()), elem_id="lora_trainer_status")
                gr.HTML('<div class="lora-trainer-chart"></div>', elem_id="lora_trainer_chart")
                saved_box = gr.HTML(elem_id="lora_trainer_saved")
            with gr.Column():
                samples = gr.Gallery(label="Samples, newest first", columns=4, height=320,
                                     elem_id="lora_trainer_samples")
        chart_data = gr.Textbox(visible=False, elem_id="lora_trainer_chart_data")
        poll_button = gr.Button("Poll", visible=False, elem_id="lora_trainer_poll")
        return cls(runner, host, status_box, saved_box, samples, chart_data, poll_button, gr.State(None))

    @property
    def started_outputs(self) -> list:
        """What `started` updates."""
        return [self.status_box, self.seen]

    def started(self, seen_now: dict | None) -> dict:
        """Updates right after this page started a job: the new job's status at once (not the last one's), and
        `seen` as if the poll had seen it running, so that the poll acts on its end even when it ends before the
        next poll."""
        status = self.runner.status()
        return {self.status_box: status_html(status),
                self.seen: {**(seen_now or {}), "kind": status.kind, "state": "running"}}

    def on_status(self, status: JobStatus, seen_before: dict | None) -> tuple[dict, bool]:
        """A poll's updates of this panel, and whether anything changed since this page's last poll."""
        refresh_cards = self.host.can_refresh_lora_cards()
        updates = {self.status_box: status_html(status), self.chart_data: chart_json(status, refresh_cards),
                   self.saved_box: saved_html(status, refresh_cards)}
        seen_now = {"kind": status.kind, "state": status.state, "samples": len(status.samples)}
        if seen_now == seen_before:
            return updates, False
        updates[self.seen] = seen_now
        if status.kind == "training":
            newest = status.samples[::-1][:SAMPLES_SHOWN]
            updates[self.samples] = [(image, f"step {step}: {prompt}") for step, prompt, image in newest]
        return updates, True
