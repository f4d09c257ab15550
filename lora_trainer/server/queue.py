"""The persistent FIFO job queue: the tab and the HTTP API submit jobs here, and one runs at a time on the
process's `JobRunner` (training, captioning and grids all use the host's model).

The queue is a JSON file in a folder the host names, rewritten atomically on every change. Loaded after a
restart, queued jobs are still queued, and a job that was running is `interrupted`, naming its last saved file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lora_trainer.errors import UserError
from lora_trainer.files import atomic_write_text
from lora_trainer.host import Host
from lora_trainer.jobs import JobRunner, JobStatus, process_runner
from lora_trainer.server.specs import JOB_KINDS, JobSpec, job_from_dict

QueueState = Literal["queued", "running", "done", "failed", "stopped", "interrupted"]
ENDED_STATES = {"finished": "done", "stopped": "stopped", "failed": "failed"}
"""The queue's name for each way a `JobRunner` job ends."""
KEPT_ENDED_JOBS = 50
"""The newest this many ended jobs stay listed; older ones drop out of the file."""
QUEUE_FILE = "queue.json"
KEPT_LOSSES = 500
"""The most loss points an ended training job keeps in the queue file."""


class NotFound(UserError):
    """A job, dataset or file that is not there (HTTP 404)."""


class JobConflict(UserError):
    """An action the job's state does not allow, e.g. cancelling a running job (HTTP 409)."""


@dataclass
class QueuedJob:
    """One job of the queue as the file keeps it."""

    id: str
    kind: str
    """"train", "caption" or "grid"."""
    name: str
    """What it works on: the output name, the folder's name, the compared files."""
    spec: dict[str, Any]
    """The job's settings (`JobSpec.to_dict`)."""
    state: QueueState = "queued"
    message: str = ""
    """How it ended, or why it failed."""
    saved: list[str] = field(default_factory=list)
    """The files a training job has saved so far (still there), oldest first."""
    grid: str | None = None
    """The grid a grid job saved."""
    step: int = 0
    """How far a training job got: its last step of `total_steps`, in `epoch`."""
    total_steps: int = 0
    epoch: int = 0
    losses: list[list[float]] = field(default_factory=list)
    """[step, loss] of a training job, at most `KEPT_LOSSES` points (evenly thinned), kept when it ends."""
    submitted_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None

    @property
    def ended(self) -> bool:
        """Whether the job will not run (any more)."""
        return self.state not in ("queued", "running")


class JobQueue:
    """Jobs in submission order; the first queued one starts when nothing runs."""

    def __init__(self, runner: JobRunner, folder: Path):
        self.runner = runner
        self.path = Path(folder) / QUEUE_FILE
        self._lock = threading.RLock()
        self._jobs = _load(self.path)
        self._runner_job: str | None = None
        """The id of the job the queue last started on the runner (whose status the runner holds)."""
        self._dispatching = False
        runner.on_change = self._runner_changed

    def start(self) -> None:
        """Begin running queued jobs, one at a time (a loaded queue waits for this)."""
        with self._lock:
            self._dispatching = True
            self._start_next()

    def submit(self, spec: JobSpec) -> QueuedJob:
        """Append `spec` to the queue (it starts at once when nothing runs); returns its entry."""
        job = QueuedJob(id=uuid.uuid4().hex[:12], kind=spec.kind, name=spec.name, spec=spec.to_dict(),
                        submitted_at=time.time())
        with self._lock:
            self._jobs.append(job)
            self._save()
            self._start_next()
            return self.job(job.id)

    def jobs(self) -> list[QueuedJob]:
        """Every job: ended ones, the running one, then the queued ones in the order they will run."""
        with self._lock:
            return [dataclasses.replace(job, saved=list(job.saved)) for job in self._jobs]

    def job(self, job_id: str) -> QueuedJob:
        """The job `job_id`, or `NotFound`."""
        with self._lock:
            for job in self._jobs:
                if job.id == job_id:
                    return dataclasses.replace(job, saved=list(job.saved))
        raise NotFound(f"there is no job {job_id!r} in the queue: list the jobs for their ids")

    def place(self, job_id: str) -> int:
        """0 for the running job, 1 for the next to run and so on; -1 for an ended job."""
        with self._lock:
            waiting = [job.id for job in self._jobs if job.state in ("running", "queued")]
            running = any(job.state == "running" for job in self._jobs)
            if job_id not in waiting:
                self.job(job_id)
                return -1
            return waiting.index(job_id) + (0 if running else 1)

    def live_status(self, job_id: str) -> JobStatus | None:
        """The runner's status of `job_id` (progress, losses, samples) when it is the running or last job."""
        with self._lock:
            return self.runner.status() if job_id == self._runner_job else None

    def cancel(self, job_id: str) -> QueuedJob:
        """Take a queued job out of the queue (or an ended one out of the list); a running one must be stopped."""
        with self._lock:
            job = self.job(job_id)
            if job.state == "running":
                raise JobConflict(f"job {job_id} is running: stop it instead (a training run saves first)")
            self._jobs = [other for other in self._jobs if other.id != job_id]
            self._save()
            return job

    def stop(self, job_id: str) -> None:
        """Ask the running job to stop (a training run saves what it has first)."""
        self._running_only(job_id, "stop").stop()

    def save_now(self, job_id: str) -> None:
        """Ask the running training job to save its weights at the next step and go on."""
        with self._lock:
            if self.job(job_id).kind != "train":
                raise JobConflict(f"job {job_id} is not a training job: only training saves weights")
            self._running_only(job_id, "save").save_now()

    def _running_only(self, job_id: str, action: str) -> JobRunner:
        with self._lock:
            job = self.job(job_id)
            if job.state != "running":
                hint = "; cancel it to take it out of the queue" if job.state == "queued" else ""
                raise JobConflict(f"job {job_id} is {job.state}, not running: nothing to {action}{hint}")
            return self.runner

    def _start_next(self) -> None:
        while self._dispatching and not any(job.state == "running" for job in self._jobs):
            job = next((job for job in self._jobs if job.state == "queued"), None)
            if job is None:
                return
            job.state, job.started_at = "running", time.time()
            self._runner_job = job.id
            try:
                job_from_dict(job.kind, job.spec).start(self.runner)
            except UserError as error:  # e.g. a job started on the runner outside the queue still runs
                job.state, job.message, job.ended_at = "failed", str(error), time.time()
            self._save()

    def _runner_changed(self, status: JobStatus) -> None:
        with self._lock:
            job = next((job for job in self._jobs if job.state == "running"), None)
            if job is None or job.id != self._runner_job:
                return
            if job.kind == "train":
                job.saved = [str(path) for path in status.saved]
                job.step, job.total_steps, job.epoch = status.step, status.total_steps, status.epoch
                if not status.running:
                    job.losses = [[step, loss] for step, loss in _thinned(status.losses, KEPT_LOSSES)]
            if not status.running:
                job.state, job.message, job.ended_at = ENDED_STATES[status.state], status.message, time.time()
                if job.kind == "grid" and status.grid_path is not None:
                    job.grid = str(status.grid_path)
                self._drop_old_ended_jobs()
            self._save()
            if not status.running:
                self._start_next()

    def _drop_old_ended_jobs(self) -> None:
        ended = [job for job in self._jobs if job.ended]
        dropped = {job.id for job in ended[:max(0, len(ended) - KEPT_ENDED_JOBS)]}
        self._jobs = [job for job in self._jobs if job.id not in dropped]

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        jobs = [dataclasses.asdict(job) for job in self._jobs]
        atomic_write_text(self.path, json.dumps({"jobs": jobs}, indent=1))


def _thinned(points: list, most: int) -> list:
    """At most `most` of `points`, evenly spread, the last one always kept."""
    if len(points) <= most:
        return list(points)
    stride = math.ceil(len(points) / most)
    return points[::-1][::stride][::-1]


def _load(path: Path) -> list[QueuedJob]:
    """The jobs of the queue file; a job that was running is interrupted. An unreadable file is moved aside (and
    said so), never overwritten."""
    if not path.is_file():
        return []
    try:
        jobs = [QueuedJob(**entry) for entry in json.loads(path.read_text(encoding="utf-8"))["jobs"]]
        if any(job.kind not in JOB_KINDS for job in jobs):
            raise ValueError("unknown job kind")
    except (OSError, ValueError, TypeError, KeyError) as error:
        kept = path.with_name(f"{path.stem}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}.json")
        path.replace(kept)
        print(f"LoRA trainer: the job queue {path} could not be read ({error}); it is kept as {kept} and the "
              "queue starts empty")
        return []
    for job in jobs:
        if job.state == "running":
            last = f"; its last saved file is {Path(job.saved[-1]).name}" if job.saved else "; it saved no file"
            job.state, job.ended_at = "interrupted", time.time()
            job.message = f"Interrupted: the application stopped while the job ran{last}"
    return jobs


_process_queue: JobQueue | None = None
_process_queue_lock = threading.Lock()


def process_queue(host: Host) -> JobQueue:
    """This process's one queue, on `process_runner(host)`, loaded from `host.queue_dir()` and started on first
    use (a reloaded UI finds it)."""
    global _process_queue
    runner = process_runner(host)
    with _process_queue_lock:
        if _process_queue is None:
            _process_queue = JobQueue(runner, Path(host.queue_dir()))
            _process_queue.start()
        return _process_queue
