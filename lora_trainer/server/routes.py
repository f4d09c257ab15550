"""The HTTP API under `/lora-trainer/v1/`: submit, watch, stop and cancel jobs of the queue, fetch their samples
and grids, and edit a dataset's captions. Written against `Host`; the WebUI skin mounts it on the WebUI's app.

Every request passes the same gate first: a body of at most `MAX_BODY_BYTES` (413), then the host's API
credentials when it has some (401); nothing is read or changed for a request that fails either. A settings
error gets 422 with the CLI's message, a path outside the datasets and Lora folders 403, an unknown job 404,
an action the job's state does not allow 409.

Imported only where FastAPI is installed (the WebUI has it; the command line does not need it).
"""

import base64
import binascii
import io
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic
from pydantic import BaseModel, Field

from lora_trainer.caption.writer import read_caption
from lora_trainer.data.images import is_image_file
from lora_trainer.data.scan import image_files
from lora_trainer.errors import UserError
from lora_trainer.host import Host
from lora_trainer.server.paths import PathRefused, confined, confined_train_config, dataset_path, lora_path
from lora_trainer.server.queue import JobConflict, JobQueue, NotFound, QueuedJob
from lora_trainer.server.specs import job_from_dict
from lora_trainer.tab.dataset import save_caption

PREFIX = "/lora-trainer/v1"
MAX_BODY_BYTES = 1 << 20
ERROR_STATUS = ((PathRefused, 403), (NotFound, 404), (JobConflict, 409), (UserError, 422))
"""The HTTP status of each kind of `UserError`, most specific first."""


class JobRequest(BaseModel):
    """A job to queue: `kind` and that kind's settings."""

    kind: str = Field(..., description='"train", "caption" or "grid"')
    config: dict[str, Any] | None = Field(
        None, description="train: the training settings, the keys of the YAML config (grouped or flat). Paths are "
        "relative to the datasets folder (dataset keys) or the Lora folder; the run saves into the Lora folder.")
    trigger_word: str | None = Field(None, description="train: the LoRA's activation text")
    preview_prompt: str | None = Field(None, description="train: the prompt of each saved file's preview")
    folder: str | None = Field(None, description="caption: the dataset folder, relative to the datasets folder")
    options: dict[str, Any] | None = Field(
        None, description="caption: model, mode, prefix, arch, pretrained, batch_size, decoding{...}")
    grid: dict[str, Any] | None = Field(
        None, description="grid: prompt, loras (file names in the Lora folder), strengths, seeds, negative_prompt, "
        "steps, cfg_scale, width, height, sampler_name")


class JobAccepted(BaseModel):
    """A queued job's id and place: 0 running, 1 next, ..."""

    id: str
    place: int
    state: str


class JobInfo(BaseModel):
    """A job of the queue: its state and, while it runs (or as the last job), its progress."""

    id: str
    kind: str
    name: str
    state: str = Field(..., description="queued, running, done, failed, stopped or interrupted")
    place: int = Field(..., description="0 running, 1 next to run, ...; -1 ended")
    message: str = Field("", description="the latest progress message; how it ended, or the error")
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    losses: list[list[float]] = Field(default_factory=list, description="[step, loss] pairs")
    validation_losses: list[list[float]] = Field(default_factory=list, description="[step, loss] pairs")
    steps_per_second: float = 0.0
    seconds_left: float = Field(0.0, description="the ETA while it runs")
    activity: str = Field("", description="what a running job does besides stepping (saving, stopping)")
    saved: list[str] = Field(default_factory=list, description="the files saved so far, in the Lora folder")
    samples: int = Field(0, description="sample images to fetch from /jobs/{id}/samples/{n}")
    grid: str | None = Field(None, description="the saved grid's file, fetched from /jobs/{id}/grid")
    settings: dict[str, Any] = Field(default_factory=dict, description="the job's settings as queued")
    submitted_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None


class CaptionedImage(BaseModel):
    """An image of a dataset and its caption (null when the caption file is not UTF-8)."""

    image: str
    caption: str | None


class DatasetListing(BaseModel):
    """The images of a dataset folder (below the datasets folder) with their captions."""

    name: str
    images: list[CaptionedImage]


class CaptionText(BaseModel):
    """A caption to write beside an image."""

    caption: str


def parse_api_auth(api_auth: str | None) -> dict[str, str]:
    """`user:pass[,user2:pass2]` (the WebUI's `--api-auth`) as user -> password; empty when there is none."""
    credentials = {}
    for pair in (api_auth or "").split(","):
        user, colon, password = pair.strip().partition(":")
        if colon:
            credentials[user] = password
    return credentials


def api_router(queue: JobQueue, host: Host) -> APIRouter:
    """The API's routes over `queue` and `host`, guarded by the host's API credentials."""
    credentials = parse_api_auth(host.api_auth())

    class GuardedRoute(APIRoute):
        """Refuses an oversized body (413) or missing/wrong credentials (401) before FastAPI reads anything, and
        answers a `UserError` with its status."""

        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                refused = await _oversized(request) or _unauthorized(request, credentials)
                if refused is not None:
                    return refused
                try:
                    return await handler(request)
                except UserError as error:
                    return _error_response(error)
            return guarded

    # Declared for the OpenAPI schema (and the docs' Authorize button); GuardedRoute does the checking.
    documented_auth = [Depends(HTTPBasic(auto_error=False))] if credentials else []
    router = APIRouter(prefix=PREFIX, route_class=GuardedRoute, dependencies=documented_auth,
                       tags=["LoRA trainer"])

    def info(job: QueuedJob) -> JobInfo:
        return _job_info(job, queue, host)

    @router.post("/jobs", response_model=JobAccepted, status_code=201, summary="Queue a job")
    def submit(request: JobRequest) -> JobAccepted:
        spec = job_from_dict(request.kind, _job_values(request, host))
        job = queue.submit(spec)
        return JobAccepted(id=job.id, place=queue.place(job.id), state=job.state)

    @router.get("/jobs", response_model=list[JobInfo], summary="Every job: ended, running, then queued")
    def list_jobs() -> list[JobInfo]:
        return [info(job) for job in queue.jobs()]

    @router.get("/jobs/{job_id}", response_model=JobInfo, summary="A job's state and progress")
    def get_job(job_id: str) -> JobInfo:
        return info(queue.job(job_id))

    @router.post("/jobs/{job_id}/stop", response_model=JobInfo, summary="Stop the running job (training saves)")
    def stop_job(job_id: str) -> JobInfo:
        queue.stop(job_id)
        return info(queue.job(job_id))

    @router.post("/jobs/{job_id}/save", response_model=JobInfo, summary="Save the running training now")
    def save_job(job_id: str) -> JobInfo:
        queue.save_now(job_id)
        return info(queue.job(job_id))

    @router.delete("/jobs/{job_id}", response_model=JobInfo,
                   summary="Cancel a queued job, or forget an ended one")
    def cancel_job(job_id: str) -> JobInfo:
        job = queue.cancel(job_id)
        return _job_info(job, None, host)

    @router.get("/jobs/{job_id}/samples/{number}", response_class=Response,
                responses={200: {"content": {"image/png": {}}}}, summary="Sample image n (from 0) of a training")
    def sample(job_id: str, number: int) -> Response:
        queue.job(job_id)
        status = queue.live_status(job_id)
        if status is None or not 0 <= number < len(status.samples):
            raise NotFound(f"job {job_id} has no sample image {number}: samples are kept for the running or last "
                           "training job, numbered from 0 (see 'samples' in its status)")
        return Response(_png_bytes(status.samples[number][2]), media_type="image/png")

    @router.get("/jobs/{job_id}/grid", response_class=FileResponse,
                responses={200: {"content": {"image/png": {}}}}, summary="The grid a grid job saved")
    def grid(job_id: str) -> FileResponse:
        job = queue.job(job_id)
        if job.grid is None or not Path(job.grid).is_file():
            raise NotFound(f"job {job_id} has no saved grid (yet)")
        return FileResponse(job.grid, media_type="image/png")

    @router.get("/datasets/{name}", response_model=DatasetListing, summary="A dataset's images and captions")
    def dataset(name: str) -> DatasetListing:
        folder = _existing_dataset(host, name)
        images = []
        for image in image_files(folder):
            try:
                caption: str | None = read_caption(image)
            except UnicodeDecodeError:
                caption = None
            images.append(CaptionedImage(image=image.relative_to(folder).as_posix(), caption=caption))
        return DatasetListing(name=name, images=images)

    @router.put("/datasets/{name}/captions/{image:path}", response_model=CaptionedImage,
                summary="Write an image's caption")
    def put_caption(name: str, image: str, body: CaptionText) -> CaptionedImage:
        folder = _existing_dataset(host, name)
        path = confined(image, folder, [folder], "image")
        if not (path.is_file() and is_image_file(path)):
            raise NotFound(f"there is no image {image!r} in dataset {name!r}: list the dataset for its images")
        save_caption(folder, path, body.caption)
        return CaptionedImage(image=path.relative_to(folder).as_posix(), caption=read_caption(path))

    return router


def _job_values(request: JobRequest, host: Host) -> dict[str, Any]:
    """The request's settings for `job_from_dict`, its paths confined and made absolute."""
    given = request.dict(exclude_unset=True, exclude_none=True) if not hasattr(request, "model_dump") \
        else request.model_dump(exclude_unset=True, exclude_none=True)
    given.pop("kind")
    if request.kind == "train" and "config" in given:
        given["config"] = confined_train_config(host, given["config"])
    if request.kind == "caption" and "folder" in given:
        folder = _existing_dataset(host, given["folder"])
        given["folder"] = str(folder)
        options = given.get("options") or {}
        if options.get("metadata_csv") is not None:  # the one file a caption job writes besides captions
            options["metadata_csv"] = str(confined(options["metadata_csv"], folder, [Path(host.datasets_dir())],
                                                   "options.metadata_csv"))
        weights = options.get("pretrained")
        if isinstance(weights, str) and _names_a_file(weights):  # a weights file, not an open_clip tag
            options["pretrained"] = str(confined(weights, Path(host.datasets_dir()),
                                                 [Path(host.datasets_dir()), Path(host.lora_dir())],
                                                 "options.pretrained"))
    if request.kind == "grid" and isinstance(given.get("grid"), dict):
        loras = given["grid"].get("loras")
        if isinstance(loras, list):
            given["grid"]["loras"] = [str(_existing_lora(host, name)) for name in loras]
    return given


def _names_a_file(weights: str) -> bool:
    """Whether captioning weights name a file (open_clip's pretrained tags have no folders or extensions)."""
    return "/" in weights or "\\" in weights or Path(weights).suffix != ""


def _existing_dataset(host: Host, name: Any) -> Path:
    folder = dataset_path(host, name, "folder")
    if not folder.is_dir():
        raise NotFound(f"there is no dataset folder {name!r} in {host.datasets_dir()}")
    return folder


def _existing_lora(host: Host, name: Any) -> Path:
    path = lora_path(host, name, "grid.loras")
    if not path.is_file():
        raise NotFound(f"there is no LoRA file {name!r} in {host.lora_dir()}")
    return path


def _job_info(job: QueuedJob, queue: JobQueue | None, host: Host) -> JobInfo:
    lora_dir = Path(host.lora_dir())
    saved = [_relative_name(Path(path), lora_dir) for path in job.saved]
    values: dict[str, Any] = dict(id=job.id, kind=job.kind, name=job.name, state=job.state, message=job.message,
                                  place=queue.place(job.id) if queue is not None else -1, saved=saved,
                                  grid=Path(job.grid).name if job.grid else None, settings=job.spec,
                                  submitted_at=job.submitted_at, started_at=job.started_at, ended_at=job.ended_at,
                                  step=job.step, total_steps=job.total_steps, epoch=job.epoch, losses=job.losses)
    status = queue.live_status(job.id) if queue is not None else None
    if status is not None:
        values.update(step=status.step, total_steps=status.total_steps, epoch=status.epoch,
                      losses=[list(point) for point in status.losses],
                      validation_losses=[list(point) for point in status.validation_losses],
                      steps_per_second=status.steps_per_second, seconds_left=status.seconds_left,
                      activity=status.activity, samples=len(status.samples) if job.kind == "train" else 0)
        if job.state == "running":
            values["message"] = status.message
    return JobInfo(**values)


def _relative_name(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else path.name


async def _oversized(request: Request) -> Response | None:
    """413 for a body over `MAX_BODY_BYTES` (by its declared length, or as it streams in); else None, with the
    body kept for FastAPI to parse."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return _too_large()
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            return _too_large()
    request._body = body  # Starlette's cache of the body: FastAPI reads it from here
    return None


def _too_large() -> Response:
    return JSONResponse({"detail": f"the request body is over {MAX_BODY_BYTES} bytes"}, status_code=413)


def _unauthorized(request: Request, credentials: dict[str, str]) -> Response | None:
    """401 unless the request's HTTP Basic credentials match one pair of `credentials` (when there are any),
    compared in constant time as the WebUI's own API does."""
    if not credentials:
        return None
    given = _basic_credentials(request.headers.get("authorization", ""))
    if given is not None:
        user, password = given
        # Every pair is compared, both halves, so the time taken says nothing about which part was wrong.
        matches = [secrets.compare_digest(user.encode(), known_user.encode())
                   + secrets.compare_digest(password.encode(), known_password.encode()) == 2
                   for known_user, known_password in credentials.items()]
        if any(matches):
            return None
    return JSONResponse({"detail": "Incorrect username or password"}, status_code=401,
                        headers={"WWW-Authenticate": "Basic"})


def _basic_credentials(header: str) -> tuple | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, colon, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if colon else None


def _error_response(error: UserError) -> Response:
    status = next(code for kind, code in ERROR_STATUS if isinstance(error, kind))
    if status == 422:  # shaped like FastAPI's own validation errors
        return JSONResponse({"detail": [{"loc": ["body"], "msg": str(error), "type": "value_error"}]},
                            status_code=422)
    return JSONResponse({"detail": str(error)}, status_code=status)


def _png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
