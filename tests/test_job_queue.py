"""The job queue's file: what a restart finds, and a file it cannot read (no model runs here)."""

from __future__ import annotations

import json

from fake_host import FakeHost

from lora_trainer.caption import CaptionOptions
from lora_trainer.jobs import JobRunner, process_runner
from lora_trainer.server.queue import JobQueue, process_queue
from lora_trainer.server.specs import CaptionJob, job_from_dict


def _queue(tmp_path) -> JobQueue:
    host = FakeHost(None, tmp_path / "Lora")
    return JobQueue(JobRunner(host), host.queue_dir())


def test_queued_jobs_are_kept_in_order_with_their_settings_across_a_restart(tmp_path):
    first = _queue(tmp_path)  # not started: the jobs wait
    specs = [CaptionJob(tmp_path / name, CaptionOptions(model="clip-tags", prefix=name)) for name in ("a", "b")]
    ids = [first.submit(spec).id for spec in specs]
    restarted = _queue(tmp_path)
    assert [job.id for job in restarted.jobs()] == ids and [restarted.place(i) for i in ids] == [1, 2]
    rebuilt = [job_from_dict(job.kind, job.spec) for job in restarted.jobs()]
    assert rebuilt == specs


def test_a_job_that_was_running_is_interrupted_after_a_restart_naming_its_last_saved_file(tmp_path):
    queue = _queue(tmp_path)
    job = queue.submit(CaptionJob(tmp_path, CaptionOptions()))
    entries = json.loads(queue.path.read_text())
    entries["jobs"][0].update(state="running", kind="train", saved=[str(tmp_path / "Lora" / "run-s000100.safetensors")])
    queue.path.write_text(json.dumps(entries))
    restored = _queue(tmp_path).job(job.id)
    assert restored.state == "interrupted" and "run-s000100.safetensors" in restored.message


def test_the_tabs_queue_table_names_the_file_an_interrupted_job_saved_last(tmp_path):
    from lora_trainer.tab.queue import queue_html

    queue = _queue(tmp_path)
    job = queue.submit(CaptionJob(tmp_path, CaptionOptions()))
    entries = json.loads(queue.path.read_text())
    saved = [str(tmp_path / "Lora" / f"run-s{step:06d}.safetensors") for step in (100, 200)]
    entries["jobs"][0].update(state="running", kind="train", saved=saved)
    queue.path.write_text(json.dumps(entries))
    table = queue_html(_queue(tmp_path).jobs())
    assert "<td>interrupted</td><td>run-s000200.safetensors</td>" in table and job.id in table


def test_an_unreadable_queue_file_is_kept_aside_and_the_queue_starts_empty(tmp_path, capsys):
    folder = FakeHost(None, tmp_path / "Lora").queue_dir()
    folder.mkdir(parents=True)
    (folder / "queue.json").write_text("{broken")
    assert _queue(tmp_path).jobs() == []
    kept = list(folder.glob("queue.unreadable-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == "{broken"
    assert not (folder / "queue.json").exists() and "could not be read" in capsys.readouterr().out


def test_the_process_keeps_one_started_queue_on_its_one_runner(tmp_path):
    host = FakeHost(None, tmp_path / "Lora")
    queue = process_queue(host)
    assert process_queue(FakeHost(None, tmp_path / "Other")) is queue and queue.runner is process_runner(host)
    job = queue.submit(CaptionJob(tmp_path / "missing", CaptionOptions()))  # started at once: it fails fast
    queue.runner.wait(60)
    assert queue.job(job.id).state == "failed" and "does not exist" in queue.job(job.id).message


def test_the_tab_says_where_a_job_it_submits_waits_and_lists_the_queue(tmp_path):
    from lora_trainer.tab.queue import queue_html, queued_choices, submit_job

    host = FakeHost(None, tmp_path / "Lora")
    queue = JobQueue(JobRunner(host), host.queue_dir())
    queue.start()
    specs = [CaptionJob(tmp_path / name, CaptionOptions()) for name in ("first", "second", "third")]
    with host.queue_lock:  # the host generates: the first job holds the runner, waiting for the model
        queue.submit(specs[0])
        notices = [submit_job(queue, spec, None, None, "started")["notice"] for spec in specs[1:]]
        jobs = queue.jobs()
        assert "starts after the running job." in notices[0]
        assert "starts after the running job and 1 queued." in notices[1]
        assert queued_choices(jobs) == [f"{job.id} · caption · {job.name}" for job in jobs[1:]]
        table = queue_html(jobs)
        assert table.index("first") < table.index("second") < table.index("third")
        assert table.count(">queued<") == 2 and table.count(">running<") == 1
        queue.runner.stop()
    queue.runner.wait(60)
