"""What a queued job does, as plain data: a training run, a captioning pass or a grid. The tab and the HTTP API
build the same objects; each turns into JSON for the queue file and back, and starts itself on a `JobRunner`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lora_trainer.caption import CaptionOptions
from lora_trainer.config import TrainConfig, _plain, config_from_dict, dataclass_from_dict
from lora_trainer.errors import UserError
from lora_trainer.grid import GridPlan
from lora_trainer.jobs import JobRunner


@dataclass
class TrainJob:
    """Train `config` on the host's loaded model (see `JobRunner.start_training`)."""

    config: TrainConfig
    trigger_word: str = ""
    preview_prompt: str = ""
    kind: ClassVar[str] = "train"

    @property
    def name(self) -> str:
        """The run's output name."""
        return self.config.saving.output_name

    def start(self, runner: JobRunner) -> None:
        """Start the run on `runner`."""
        runner.start_training(self.config, self.trigger_word, self.preview_prompt)

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-ready values (the config as the YAML the CLI reads, grouped)."""
        return {"config": self.config.to_dict(), "trigger_word": self.trigger_word,
                "preview_prompt": self.preview_prompt}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainJob:
        """The job `to_dict` describes; a bad config key raises the CLI's `UserError`."""
        _known_keys(values, {"config", "trigger_word", "preview_prompt"}, "a train job")
        config = values.get("config")
        if not isinstance(config, dict):
            raise UserError("a train job needs 'config': the training settings as the YAML config's keys")
        return cls(config_from_dict(config), _text(values, "trigger_word"), _text(values, "preview_prompt"))


@dataclass
class CaptionJob:
    """Caption the images of `folder` in place (see `JobRunner.start_captioning`)."""

    folder: Path
    options: CaptionOptions
    kind: ClassVar[str] = "caption"

    @property
    def name(self) -> str:
        """The folder's name."""
        return self.folder.name

    def start(self, runner: JobRunner) -> None:
        """Start captioning on `runner`."""
        runner.start_captioning(self.folder, self.options)

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-ready values."""
        return {"folder": str(self.folder), "options": _plain(self.options)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CaptionJob:
        """The job `to_dict` describes; a bad option raises a `UserError` naming it."""
        _known_keys(values, {"folder", "options"}, "a caption job")
        folder = values.get("folder")
        if not isinstance(folder, str) or not folder.strip():
            raise UserError("a caption job needs 'folder': the dataset folder whose images get captions")
        return cls(Path(folder), dataclass_from_dict(CaptionOptions, values.get("options") or {}, "options"))


@dataclass
class GridJob:
    """Render `plan` through the host's pipeline (see `JobRunner.start_grid`)."""

    plan: GridPlan
    kind: ClassVar[str] = "grid"

    @property
    def name(self) -> str:
        """The compared files' names."""
        return ", ".join(Path(path).stem for path in self.plan.loras)

    def start(self, runner: JobRunner) -> None:
        """Start rendering on `runner`."""
        runner.start_grid(self.plan)

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-ready values."""
        return {"grid": _plain(self.plan)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GridJob:
        """The job `to_dict` describes; a bad setting raises a `UserError` naming it."""
        _known_keys(values, {"grid"}, "a grid job")
        return cls(dataclass_from_dict(GridPlan, values.get("grid"), "grid"))


JobSpec = TrainJob | CaptionJob | GridJob
JOB_KINDS: dict[str, type[TrainJob] | type[CaptionJob] | type[GridJob]] = {
    job_type.kind: job_type for job_type in (TrainJob, CaptionJob, GridJob)}


def job_from_dict(kind: str, values: dict[str, Any]) -> JobSpec:
    """The job of `kind` ("train", "caption" or "grid") that `values` describe."""
    if kind not in JOB_KINDS:
        raise UserError(f"unknown job kind {kind!r}: use one of {', '.join(JOB_KINDS)}")
    return JOB_KINDS[kind].from_dict(values)


def _known_keys(values: dict[str, Any], known: set[str], what: str) -> None:
    for key in values:
        if key not in known:
            raise UserError(f"{what} has no key '{key}'; its keys: {', '.join(sorted(known))}")


def _text(values: dict[str, Any], key: str) -> str:
    value = values.get(key) or ""
    if not isinstance(value, str):
        raise UserError(f"'{key}' should be a string, got {value!r}")
    return value

