"""Background jobs inside a host: training on the host's loaded model, one job at a time."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

pytest.importorskip("ldm")

from fake_host import FakeHost, FakeTask  # noqa: E402
from ldm_models import tiny_sd1  # noqa: E402

from lora_trainer.caption import CaptionOptions  # noqa: E402
from lora_trainer.config import TrainConfig, config_from_dict  # noqa: E402
from lora_trainer.errors import UserError  # noqa: E402
from lora_trainer.jobs import JobRunner, process_runner  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_sd1(tmp_path_factory.mktemp("sd1"))


@pytest.fixture
def host(model, tmp_path):
    return FakeHost(model, tmp_path / "Lora")


def _config(dataset, **overrides) -> TrainConfig:
    settings = dict(train_data_dir=dataset, resolution=32, bucket_step=8, lora_rank=4, learning_rate=1e-3,
                    max_train_steps=4, output_name="job", logging_dir=None, log_every_n_steps=1)
    settings.update(overrides)
    return config_from_dict(settings)


def _state_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_training_job_saves_into_the_host_lora_folder_with_preview_and_user_metadata(host, shapes_dataset):
    runner = JobRunner(host)
    runner.start_training(_config(shapes_dataset, save_every_n_steps=2), trigger_word="sks",
                          preview_prompt="sks, a red shape")
    status = runner.wait(120)
    assert status.state == "finished", status.message
    names = [path.name for path in status.saved]
    assert names == ["job-s000002.safetensors", "job.safetensors"]
    for path in status.saved:
        assert path.parent == host.lora_dir()
        assert path.with_name(f"{path.stem}.preview.png").is_file()
        user_metadata = json.loads(path.with_suffix(".json").read_text())
        assert user_metadata["activation text"] == "sks" and user_metadata["sd version"] == "SD1"
    assert host.registered == ["job-s000002", "job"]
    assert [step for step, _ in status.losses] == [1, 2, 3, 4]


def test_training_job_reports_progress_to_the_host(host, shapes_dataset):
    runner = JobRunner(host)
    runner.start_training(_config(shapes_dataset))
    runner.wait(120)
    training = [(step, total) for step, total, text in host.task.updates if text.startswith("Training LoRA")]
    assert training == [(step, 4) for step in range(1, 5)]
    assert not host.queue_lock.locked()


def test_training_job_reports_steps_per_second_and_samples_per_second(host, shapes_dataset):
    runner = JobRunner(host)
    runner.start_training(_config(shapes_dataset, batch_size=2, gradient_accumulation_steps=2))
    status = runner.wait(120)
    assert status.state == "finished", status.message
    assert status.steps_per_second > 0
    assert status.samples_per_second == pytest.approx(4 * status.steps_per_second)


def test_loaded_model_is_bit_identical_after_a_job(host, model, shapes_dataset):
    before = _state_hash(model)
    runner = JobRunner(host)
    runner.start_training(_config(shapes_dataset, train_text_encoder=True), preview_prompt="sks")
    assert runner.wait(120).state == "finished"
    assert _state_hash(model) == before


def test_a_second_job_while_one_runs_is_refused(host, shapes_dataset):
    runner = JobRunner(host)
    runner.start_training(_config(shapes_dataset, max_train_steps=200))
    with pytest.raises(UserError, match="already running"):
        runner.start_training(_config(shapes_dataset, output_name="other"))
    runner.stop()
    assert runner.wait(120).state == "stopped"


def test_stop_saves_the_weights_so_far(host, shapes_dataset):
    runner = JobRunner(host)
    runner.start_training(_config(shapes_dataset, max_train_steps=500))
    _wait_for(lambda: runner.status().step >= 2)
    runner.stop()
    status = runner.wait(120)
    assert status.state == "stopped"
    assert status.saved and status.saved[-1].name.startswith("job-s")


def test_a_job_asked_to_stop_says_so_until_it_has(host, shapes_dataset):
    runner = JobRunner(host)
    runner.start_training(_config(shapes_dataset, max_train_steps=500))
    _wait_for(lambda: runner.status().step >= 1)
    runner.stop()
    status = runner.status()
    assert status.activity == "stopping" or status.activity.startswith("saving ") or not status.running
    final = runner.wait(120)
    assert final.state == "stopped" and final.activity == ""


def test_the_hosts_interrupt_button_stops_the_job(host, shapes_dataset):
    runner = JobRunner(host)
    runner.start_training(_config(shapes_dataset, max_train_steps=500))
    _wait_for(lambda: runner.status().step >= 1)
    host.task.interrupt.set()
    assert runner.wait(120).state == "stopped"


def test_a_job_shows_the_latent_caching_and_stops_there_with_nothing_saved(host, shapes_dataset, monkeypatch):
    update = FakeTask.update

    def interrupt_while_caching(task, step, total, text, image=None):
        update(task, step, total, text, image)
        if text.startswith("Caching latents"):
            task.interrupt.set()

    monkeypatch.setattr(FakeTask, "update", interrupt_while_caching)
    runner = JobRunner(host)
    runner.start_training(_config(shapes_dataset, vae_batch_size=1, max_train_steps=500))
    status = runner.wait(120)
    assert (status.state, status.message) == ("stopped", "Stopped before training began; nothing was saved")
    assert host.task.updates == [(1, 4, "Caching latents: 1/4 images")]
    assert status.step == 0 and not status.saved and not list(host.lora_dir().glob("*.safetensors"))


def test_the_hosts_stop_after_this_step_stops_the_job_and_saves(host, shapes_dataset):
    # A1111's Interrupt with "Don't Interrupt in the middle": one click must stop the run, not the second.
    runner = JobRunner(host)
    runner.start_training(_config(shapes_dataset, max_train_steps=500))
    _wait_for(lambda: runner.status().step >= 1)
    host.task.stop_generating.set()
    status = runner.wait(120)
    assert status.state == "stopped" and status.step < 500
    assert status.saved and status.saved[-1].name.startswith("job-s") and status.saved[-1].is_file()


def test_speed_leaves_out_the_time_spent_saving_which_shows_as_its_own_activity(host, shapes_dataset, monkeypatch):
    seen_while_saving = []

    def slow_register(path):
        seen_while_saving.append(runner.status().activity)
        time.sleep(1.0)

    monkeypatch.setattr(host, "register_lora", slow_register)
    runner = JobRunner(host)
    runner.start_training(_config(shapes_dataset, save_every_n_steps=1))
    status = runner.wait(120)
    assert status.state == "finished", status.message
    assert seen_while_saving[0] == "saving job-s000001.safetensors"
    assert 1 / status.steps_per_second < 0.9  # a step took well under the second each save took
    assert status.activity == ""


def test_the_last_training_runs_settings_stay_through_later_jobs(host, shapes_dataset, tmp_path):
    runner = JobRunner(host)
    config = _config(shapes_dataset)
    runner.start_training(config, trigger_word="sks")
    runner.wait(120)
    runner.start_captioning(tmp_path / "missing", CaptionOptions())
    status = runner.wait(60)
    assert status.kind == "captioning"
    assert status.config.dataset.train_data_dir == shapes_dataset and status.config.saving.output_name == "job"
    assert status.trigger_word == "sks"


def test_only_the_last_n_saves_stay_with_their_previews_and_the_host_forgets_the_others(host, shapes_dataset):
    runner = JobRunner(host)
    runner.start_training(_config(shapes_dataset, max_train_steps=5, save_every_n_steps=1, keep_last_n_saves=2),
                          trigger_word="sks", preview_prompt="sks")
    status = runner.wait(120)
    assert status.state == "finished", status.message
    assert [path.name for path in status.saved] == ["job-s000003.safetensors", "job-s000004.safetensors",
                                                    "job.safetensors"]
    assert sorted(path.name for path in host.lora_dir().iterdir()) == sorted(
        f"{path.stem}{suffix}" for path in status.saved for suffix in (".safetensors", ".preview.png", ".json"))
    assert host.forgotten == ["job-s000001", "job-s000002"]


def test_save_now_writes_a_file_and_training_goes_on(host, shapes_dataset):
    runner = JobRunner(host)
    runner.start_training(_config(shapes_dataset, max_train_steps=30))
    _wait_for(lambda: runner.status().step >= 2)
    runner.save_now()
    status = runner.wait(120)
    assert status.state == "finished"
    assert len(status.saved) == 2 and status.saved[-1].name == "job.safetensors"


def test_a_user_error_ends_the_job_with_its_message(host, tmp_path):
    runner = JobRunner(host)
    runner.start_training(_config(tmp_path / "missing"))
    status = runner.wait(60)
    assert status.state == "failed" and "does not exist" in status.message
    assert not host.queue_lock.locked()


def _wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_the_process_keeps_one_runner_across_ui_reloads(host, model, tmp_path):
    first = process_runner(host)
    reloaded_host = FakeHost(model, tmp_path / "Lora")
    assert process_runner(reloaded_host) is first
    assert first.host is reloaded_host


def test_class_images_are_drawn_through_the_hosts_pipeline_before_training(host, shapes_dataset, tmp_path):
    runner = JobRunner(host)
    runner.start_training(_config(shapes_dataset, class_prompt="a shape", num_class_images=2,
                                  reg_data_dir=tmp_path / "reg"))
    status = runner.wait(120)
    assert status.state == "finished", status.message
    assert [request.prompt for request in host.renders[:2]] == ["a shape", "a shape"]
    assert sorted(path.name for path in (tmp_path / "reg" / "1_a_shape").iterdir()) == \
        ["class-00000.png", "class-00000.txt", "class-00001.png", "class-00001.txt"]


def test_an_interrupt_while_a_class_image_is_drawn_keeps_no_cut_short_image_and_ends_before_training(
        host, shapes_dataset, tmp_path):
    render = host.render

    def render_then_interrupt(request):
        image = render(request)
        host.task.interrupt.set()  # the host's Interrupt during this image: its sampling stopped early
        return image

    host.render = render_then_interrupt
    runner = JobRunner(host)
    runner.start_training(_config(shapes_dataset, class_prompt="a shape", num_class_images=3,
                                  reg_data_dir=tmp_path / "reg"))
    status = runner.wait(120)
    assert (status.state, status.message) == ("stopped", "Stopped before training began; nothing was saved")
    assert len(host.renders) == 1 and not list((tmp_path / "reg" / "1_a_shape").iterdir())
    assert not list(host.lora_dir().glob("*.safetensors"))


def test_a_job_started_while_the_host_generates_waits_for_the_model_then_runs(host, shapes_dataset):
    runner = JobRunner(host)
    with host.queue_lock:  # one of the host's own generations holds the model
        runner.start_training(_config(shapes_dataset, max_train_steps=2))
        _wait_for(lambda: "Waiting for the model" in runner.status().message)
        assert runner.status().running and runner.status().step == 0
    status = runner.wait(120)
    assert status.state == "finished" and status.step == 2, status.message


def test_a_job_waiting_for_the_host_can_be_stopped_before_it_starts(host, shapes_dataset):
    runner = JobRunner(host)
    with host.queue_lock:
        runner.start_training(_config(shapes_dataset))
        _wait_for(lambda: "Waiting for the model" in runner.status().message)
        runner.stop()
        status = runner.wait(60)
    assert status.state == "stopped" and status.saved == [] and "before the training started" in status.message
