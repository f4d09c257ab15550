"""The seam to an application that hosts the trainer (the WebUI, or a test's fake).

The WebUI extension implements `Host` once, in `scripts/`; everything else (the background job, the tab's
logic) is written against this interface, so it runs the same with the fake host in the tests.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from lora_trainer.errors import UserError
from lora_trainer.models.base import DiffusionBackend, ModelFamily


class HostBusy(UserError):
    """The host's model is in use (one of its own generations, or a job): a job waits and tries again."""


@dataclass
class RenderRequest:
    """One txt2img job through the host's own pipeline. `prompt` may carry `<lora:name:weight>` tags."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler_name: str = ""
    """Empty: the host's default sampler."""


@dataclass
class RenderDefaults:
    """The host's txt2img defaults, to pre-fill sample and grid settings."""

    sampler_name: str = "Euler a"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512


class HostTask(Protocol):
    """A running job as the host shows it: its progress bar, preview and Interrupt button."""

    def update(self, step: int, total: int, text: str, image: Image.Image | None = None) -> None:
        """Show progress `step`/`total` with a one-line `text` and, optionally, a preview image."""

    def interrupted(self) -> bool:
        """True once the user pressed the host's own Interrupt button."""

    def stop_requested(self) -> bool:
        """True once the user asked the host to stop after the current item (A1111's Interrupt with "Don't
        Interrupt in the middle"): a training run stops after its current step and saves."""


class Host(Protocol):
    """What the trainer needs from the application it runs in."""

    def model_family(self) -> ModelFamily | None:
        """The family of the loaded model (for default settings), or None when no model is loaded."""

    def loaded_model_backend(self) -> DiffusionBackend:
        """A training backend over the loaded model itself (no copy, no reload). Only inside `busy`
        (outside it: AssertionError).

        Raises `UserError` when no model is loaded or it cannot be trained (fp8 storage, --lowvram...).
        """

    def busy(self, job_name: str) -> AbstractContextManager[HostTask]:
        """Hold the host's model exclusively (its generation queue waits) and show the job's progress.

        Never waits and is not re-entrant: raises `HostBusy` at once when the host is busy.
        """

    def render(self, request: RenderRequest) -> Image.Image:
        """One image through the host's pipeline with the model as it is now. Only inside `busy`
        (outside it: AssertionError)."""

    def render_defaults(self) -> RenderDefaults:
        """The host's txt2img settings."""

    def lora_dir(self) -> Path:
        """Where the host looks for LoRA files."""

    def grids_dir(self) -> Path:
        """Where the host saves grids."""

    def datasets_dir(self) -> Path | None:
        """A default folder for datasets, if the host has one."""

    def queue_dir(self) -> Path:
        """A folder of the host's own where the trainer keeps its job queue across restarts."""

    def api_auth(self) -> str | None:
        """The HTTP API's credentials as the host's own API takes them (`user:pass[,user2:pass2]`), or None
        when the host's API is open."""

    def register_lora(self, path: Path) -> None:
        """Make a LoRA file written into `lora_dir` usable at once (`<lora:stem:0.8>`)."""

    def forget_lora(self, path: Path) -> None:
        """A LoRA file registered earlier was deleted from `lora_dir`: stop offering it."""

    def can_refresh_lora_cards(self) -> bool:
        """Whether the page may press the host's Lora-card refresh after a save to show the new card, i.e.
        whether that refresh changes nothing else."""


def list_loras(host: Host) -> list[Path]:
    """LoRA files in the host's folder, newest first."""
    files = [path for path in Path(host.lora_dir()).rglob("*.safetensors") if path.is_file()]
    return sorted(files, key=lambda path: path.stat().st_mtime, reverse=True)
