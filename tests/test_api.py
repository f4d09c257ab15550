"""The HTTP API and its job queue: a real uvicorn server on localhost, a real HTTP client, the fake host's tiny
ldm model. Jobs run one at a time in submission order, survive a restart, and bad or unauthorised requests
change nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from api_server import serve_api  # noqa: E402
from conftest import write_shapes_dataset  # noqa: E402
from fake_host import FakeHost  # noqa: E402

from lora_trainer.jobs import JobRunner  # noqa: E402
from lora_trainer.server.queue import JobQueue  # noqa: E402

AUTH = ("alice", "s3cret")
TIMEOUT = 120


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny ldm model, for the tests that run jobs (the others run in every environment with FastAPI)."""
    pytest.importorskip("ldm")
    from ldm_models import tiny_sd1

    return tiny_sd1(tmp_path_factory.mktemp("sd1"))


@pytest.fixture(scope="module")
def base_lora(model, tmp_path_factory) -> Path:
    """A LoRA file of the tiny model (two steps), for grid jobs to compare."""
    from lora_trainer.config import config_from_dict

    folder = tmp_path_factory.mktemp("base-lora")
    runner = JobRunner(FakeHost(model, folder / "Lora"))
    runner.start_training(config_from_dict(_train_settings(write_shapes_dataset(folder / "shapes"), "base", 2)))
    status = runner.wait(TIMEOUT)
    assert status.state == "finished", status.message
    return status.saved[-1]


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> Path:
    pytest.importorskip("open_clip")
    from caption_models import TINY_CLIP, register_tiny_configs, save_tiny_checkpoint

    folder = tmp_path_factory.mktemp("open-clip")
    register_tiny_configs(folder)
    return save_tiny_checkpoint(TINY_CLIP, folder / "tiny-clip.pt")


def _host(model, folder: Path) -> FakeHost:
    host = FakeHost(model, folder / "Lora", datasets_dir=folder / "datasets", api_auth=f"{AUTH[0]}:{AUTH[1]}")
    write_shapes_dataset(folder / "datasets" / "shapes")
    return host


@pytest.fixture
def host(tmp_path) -> FakeHost:
    """A host without a model: enough for requests that run no job."""
    return _host(None, tmp_path)


@pytest.fixture
def model_host(model, tmp_path) -> FakeHost:
    return _host(model, tmp_path)


@contextmanager
def _api(host: FakeHost) -> Iterator[tuple[JobQueue, httpx.Client]]:
    """A started queue on `host` and a client of its API, logged in."""
    queue = JobQueue(JobRunner(host), host.queue_dir())
    queue.start()
    try:
        with serve_api(queue, host) as url, httpx.Client(base_url=f"{url}/lora-trainer/v1", auth=AUTH,
                                                         timeout=30) as client:
            yield queue, client
    finally:
        queue.runner.stop()
        queue.runner.wait(TIMEOUT)


@pytest.fixture
def queue_and_client(host):
    with _api(host) as served:
        yield served


@pytest.fixture
def queue(queue_and_client):
    return queue_and_client[0]


@pytest.fixture
def client(queue_and_client):
    return queue_and_client[1]


def _train_settings(dataset, name: str, steps: int, **overrides) -> dict:
    return dict(train_data_dir=str(dataset), resolution=32, bucket_step=8, lora_rank=4, learning_rate=1e-3,
                max_train_steps=steps, output_name=name, logging_dir=None, log_every_n_steps=1, **overrides)


def _train_job(name: str, steps: int, **overrides) -> dict:
    return {"kind": "train", "config": {k: v for k, v in _train_settings("shapes", name, steps, **overrides).items()
                                        if k != "logging_dir"}, "trigger_word": "sks"}


def _wait_for(client, job_id: str, condition, what: str) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if condition(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; the job is {job}")
        time.sleep(0.05)


def _submit(client, request: dict) -> dict:
    answer = client.post("/jobs", json=request)
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_jobs_run_one_at_a_time_in_order_and_can_be_stopped_cancelled_and_watched(model_host, tmp_path, base_lora,
                                                                                    clip_weights):
    from caption_models import TINY_CLIP

    (tmp_path / "datasets" / "tiny-clip.pt").write_bytes(clip_weights.read_bytes())
    (tmp_path / "Lora" / base_lora.name).write_bytes(base_lora.read_bytes())
    with _api(model_host) as (_, client):
        _three_jobs_in_order(client, tmp_path, base_lora, TINY_CLIP)


def _three_jobs_in_order(client, tmp_path: Path, base_lora: Path, clip_arch: str) -> None:
    train = _submit(client, _train_job("long", 1000, save_every_n_steps=2, sample_every_n_steps=2,
                                       sample_prompts=["sks, a red shape"], sample_steps=2))
    caption = _submit(client, {"kind": "caption", "folder": "shapes", "options": {
        "model": "clip-tags", "arch": clip_arch, "pretrained": "tiny-clip.pt", "prefix": "sks", "mode": "overwrite"}})
    grid = _submit(client, {"kind": "grid", "grid": {"prompt": "sks", "loras": [base_lora.name],
                                                     "strengths": [0, 1], "steps": 2, "width": 32, "height": 32}})
    extra = _submit(client, _train_job("extra", 2))
    assert [job["place"] for job in (train, caption, grid, extra)] == [0, 1, 2, 3]
    assert [job["state"] for job in client.get("/jobs").json()] == ["running", "queued", "queued", "queued"]

    running = _wait_for(client, train["id"], lambda job: job["samples"] >= 1 and job["saved"], "a save and a sample")
    assert running["step"] >= 2 and running["total_steps"] == 1000 and running["losses"][0][0] == 1
    assert running["steps_per_second"] > 0 and running["seconds_left"] > 0
    sample = client.get(f"/jobs/{train['id']}/samples/0")
    assert sample.status_code == 200 and sample.content.startswith(b"\x89PNG")
    assert client.delete(f"/jobs/{train['id']}").status_code == 409  # running: stop it instead
    assert client.delete(f"/jobs/{extra['id']}").status_code == 200
    assert client.get(f"/jobs/{extra['id']}").status_code == 404
    assert client.post(f"/jobs/{caption['id']}/stop").status_code == 409  # queued: nothing to stop

    assert client.post(f"/jobs/{train['id']}/stop").status_code == 200
    stopped = _wait_for(client, train["id"], lambda job: job["state"] != "running", "the training to stop")
    assert stopped["state"] == "stopped" and stopped["saved"][-1].startswith("long-s")
    assert (tmp_path / "Lora" / stopped["saved"][-1]).is_file()
    ended = [_wait_for(client, job["id"], lambda job: job["state"] not in ("queued", "running"), "the job to end")
             for job in (caption, grid)]
    assert [job["state"] for job in ended] == ["done", "done"], ended
    jobs = [stopped, *ended]
    for earlier, later in zip(jobs, jobs[1:]):
        assert earlier["ended_at"] <= later["started_at"]  # one at a time, in submission order
    # Once later jobs have run, the training still reports how far it got and its losses.
    after = client.get(f"/jobs/{train['id']}").json()
    assert after["step"] == stopped["step"] >= 2 and after["total_steps"] == 1000
    assert after["losses"] and after["losses"][-1] == stopped["losses"][-1]
    captions = [path.read_text() for path in sorted((tmp_path / "datasets" / "shapes").glob("*.txt"))]
    assert len(captions) == 4 and all(text.startswith("sks, ") for text in captions)
    picture = client.get(f"/jobs/{grid['id']}/grid")
    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
    assert not (tmp_path / "Lora" / "extra.safetensors").exists()


def test_save_now_writes_a_file_while_the_training_goes_on(model_host, tmp_path):
    with _api(model_host) as (_, client):
        train = _submit(client, _train_job("saving", 1000))
        _wait_for(client, train["id"], lambda job: job["step"] >= 1, "the first step")
        assert client.post(f"/jobs/{train['id']}/save").status_code == 200
        saved = _wait_for(client, train["id"], lambda job: job["saved"], "the save")
        assert saved["state"] == "running" and (tmp_path / "Lora" / saved["saved"][0]).is_file()


def test_a_restart_mid_run_restores_the_queue_and_marks_the_running_job_interrupted(model_host):
    host = model_host
    first = JobQueue(JobRunner(host), host.queue_dir())
    first.start()
    with serve_api(first, host) as url, httpx.Client(base_url=f"{url}/lora-trainer/v1", auth=AUTH) as client:
        train = _submit(client, _train_job("crash", 1000, save_every_n_steps=2))
        waiting = _submit(client, _train_job("after", 2))
        saved = _wait_for(client, train["id"], lambda job: job["saved"], "a saved file")["saved"][-1]
    # The process dies here: nothing more reaches the queue file. (The runner is then stopped to free the model.)
    first.runner.on_change = None
    first.runner.stop()
    first.runner.wait(TIMEOUT)

    restarted = JobQueue(JobRunner(host), host.queue_dir())
    with serve_api(restarted, host) as url, httpx.Client(base_url=f"{url}/lora-trainer/v1", auth=AUTH) as client:
        jobs = {job["id"]: job for job in client.get("/jobs").json()}
        assert jobs[train["id"]]["state"] == "interrupted"
        assert saved in jobs[train["id"]]["message"] and jobs[train["id"]]["saved"][-1] == saved
        assert jobs[waiting["id"]]["state"] == "queued" and jobs[waiting["id"]]["place"] == 1
        restarted.start()
        done = _wait_for(client, waiting["id"], lambda job: job["state"] == "done", "the restored job to run")
        assert done["saved"] == ["after.safetensors"]


@pytest.mark.parametrize("auth", [None, ("alice", "wrong"), ("mallory", "s3cret")], ids=["none", "password", "user"])
def test_requests_without_the_right_credentials_get_401_and_change_nothing(queue, host, auth):
    with serve_api(queue, host) as url, httpx.Client(base_url=f"{url}/lora-trainer/v1", auth=auth) as client:
        for method, path, body in [("POST", "/jobs", _train_job("sneaky", 2)), ("GET", "/jobs", None),
                                   ("PUT", "/datasets/shapes/captions/00.png", {"caption": "pwned"}),
                                   ("GET", "/datasets/shapes", None)]:
            answer = client.request(method, path, json=body)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Basic"
    assert queue.jobs() == [] and not host.queue_dir().exists()
    assert (host.datasets_dir() / "shapes" / "00.txt").read_text() == "sks, a red shape"


def test_the_right_credentials_of_any_configured_user_are_accepted(tmp_path):
    host = FakeHost(None, tmp_path / "Lora", datasets_dir=tmp_path / "datasets", api_auth="alice:one, bob:two")
    queue = JobQueue(JobRunner(host), host.queue_dir())
    with serve_api(queue, host) as url:
        for user in (("alice", "one"), ("bob", "two")):
            assert httpx.get(f"{url}/lora-trainer/v1/jobs", auth=user).status_code == 200
        assert httpx.get(f"{url}/lora-trainer/v1/jobs", auth=("alice", "two")).status_code == 401


@pytest.mark.parametrize("request_body, key", [
    (_train_job("x", 2) | {"config": {"train_data_dir": "../outside", "output_name": "x"}}, "train_data_dir"),
    (_train_job("x", 2) | {"config": {"train_data_dir": "/etc", "output_name": "x"}}, "train_data_dir"),
    (_train_job("x", 2) | {"config": {"train_data_dir": "escape", "output_name": "x"}}, "train_data_dir"),
    (_train_job("x", 2) | {"config": {"train_data_dir": "shapes", "output_dir": "/tmp"}}, "output_dir"),
    (_train_job("x", 2) | {"config": {"train_data_dir": "shapes", "logging_dir": "../logs"}}, "logging_dir"),
    (_train_job("x", 2) | {"config": {"dataset": {"subsets": [{"image_dir": "escape"}]}}}, "image_dir"),
    ({"kind": "caption", "folder": "escape"}, "folder"),
    ({"kind": "caption", "folder": "shapes", "options": {"metadata_csv": "../../meta.csv"}}, "metadata_csv"),
    ({"kind": "grid", "grid": {"prompt": "sks", "loras": ["../outside/x.safetensors"]}}, "loras"),
], ids=["dotdot", "absolute", "symlink", "output_dir", "logging_dir", "subset", "caption", "metadata_csv", "grid"])
def test_paths_that_lead_outside_the_datasets_and_lora_folders_are_refused_and_nothing_is_written(
        client, queue, host, tmp_path, request_body, key):
    outside = tmp_path / "outside"
    write_shapes_dataset(outside)
    (host.datasets_dir() / "escape").symlink_to(outside, target_is_directory=True)
    before = sorted(path.name for path in tmp_path.rglob("*"))
    answer = client.post("/jobs", json=request_body)
    assert answer.status_code == 403, answer.text
    assert key in answer.json()["detail"]
    assert queue.jobs() == [] and sorted(path.name for path in tmp_path.rglob("*")) == before


def test_caption_edits_are_confined_to_the_dataset(client, host, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes((host.datasets_dir() / "shapes" / "00.png").read_bytes())
    # Percent-encoded, so that the client sends the dots as they are (the server decodes them).
    for image in ("..%2F..%2Foutside.png", str(outside)):
        answer = client.put(f"/datasets/shapes/captions/{image}", json={"caption": "pwned"})
        assert answer.status_code == 403, answer.text
    assert client.get("/datasets/%2E%2E").status_code == 403
    assert not (tmp_path / "outside.txt").exists()


def test_a_dataset_lists_its_images_with_captions_and_a_caption_can_be_rewritten(client, host):
    listing = client.get("/datasets/shapes").json()
    assert listing["images"][0] == {"image": "00.png", "caption": "sks, a red shape"}
    assert len(listing["images"]) == 4
    answer = client.put("/datasets/shapes/captions/00.png", json={"caption": "sks, a square"})
    assert answer.json() == {"image": "00.png", "caption": "sks, a square"}
    assert (host.datasets_dir() / "shapes" / "00.txt").read_text() == "sks, a square"
    assert client.put("/datasets/shapes/captions/missing.png", json={"caption": "x"}).status_code == 404
    assert client.get("/datasets/missing").status_code == 404


@pytest.mark.parametrize("body, named", [
    ('{"kind": "train", "config": {', None),
    ('{"kind": "train", "config": 5}', "config"),
    ('{"config": {}}', "kind"),
    ('{"kind": "paint"}', "paint"),
    (json.dumps(_train_job("x", 2) | {"config": {"train_data_dir": "shapes", "learning_rate": "fast"}}),
     "learning_rate"),
    (json.dumps(_train_job("x", 2) | {"config": {"train_data_dir": "shapes", "lora_rnak": 4}}), "lora_rnak"),
    (json.dumps({"kind": "caption", "folder": "shapes", "options": {"batch_size": "eight"}}), "batch_size"),
    (json.dumps({"kind": "grid", "grid": {"prompt": "sks", "loras": [], "seeds": "one"}}), "seeds"),
    (json.dumps({"kind": "grid", "grid": {"prompt": "sks"}}), "loras"),
    (json.dumps({"kind": "train", "config": {"output_name": "x"}}), "train_data_dir"),
    (json.dumps({"kind": "train", "config": {"train_data_dir": "shapes"}, "folder": "shapes"}), "folder"),
], ids=["broken-json", "config-type", "no-kind", "kind", "value", "unknown-key", "caption-option", "grid-setting",
        "grid-missing-key", "no-dataset", "other-kind's-key"])
def test_malformed_or_mistyped_requests_get_422_naming_the_field_and_queue_nothing(client, queue, body, named):
    answer = client.post("/jobs", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    if named is not None:
        assert named in json.dumps(answer.json()["detail"])
    assert queue.jobs() == []


def test_an_oversized_body_gets_413_and_queues_nothing(client, queue):
    padding = "x" * (1 << 20)
    answer = client.post("/jobs", json=_train_job("big", 2) | {"trigger_word": padding})
    assert answer.status_code == 413
    assert queue.jobs() == []


def test_the_openapi_schema_documents_every_route_and_model(client):
    schema = httpx.get(str(client.base_url).split("/lora-trainer/")[0] + "/openapi.json").json()
    prefix = "/lora-trainer/v1"
    assert {path.removeprefix(prefix) for path in schema["paths"]} == {
        "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/stop", "/jobs/{job_id}/save", "/jobs/{job_id}/samples/{number}",
        "/jobs/{job_id}/grid", "/datasets/{name}", "/datasets/{name}/captions/{image}"}
    assert {"JobRequest", "JobAccepted", "JobInfo", "DatasetListing", "CaptionText"} <= set(
        schema["components"]["schemas"])
    assert schema["paths"][f"{prefix}/jobs"]["post"]["requestBody"]


def test_api_auth_is_read_as_comma_separated_user_password_pairs():
    from lora_trainer.server.routes import parse_api_auth

    assert parse_api_auth("alice:one,bob:t:w:o") == {"alice": "one", "bob": "t:w:o"}
    assert parse_api_auth(None) == {} and parse_api_auth("") == {}
