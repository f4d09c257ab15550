"""Caption a folder of images in place: the library entry point behind the CLI and the WebUI tab."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image

from lora_trainer.caption.coca import CocaCaptioner, CocaDecoding
from lora_trainer.caption.models import load_open_clip
from lora_trainer.caption.tags import ClipTagger
from lora_trainer.caption.writer import (
    CAPTION_EXTENSION,
    CAPTION_MODES,
    caption_path,
    compose_caption,
    write_caption,
    write_metadata_csv,
)
from lora_trainer.data.images import UnreadableImage, load_rgb_image
from lora_trainer.data.scan import METADATA_FILENAME, MetadataCaptions, existing_caption, image_files, read_metadata
from lora_trainer.errors import UserError
from lora_trainer.models.base import resolve_device

DEFAULT_WEIGHTS = {
    "coca": ("coca_ViT-L-14", "mscoco_finetuned_laion2b_s13b_b90k"),
    "clip-tags": ("ViT-L-14", "openai"),
}
"""Per captioner: the open_clip architecture and pretrained tag used unless others are named."""


class Captioner(Protocol):
    """Anything that turns a batch of images into one caption each."""

    def caption(self, images: list[Image.Image]) -> list[str]: ...


@dataclass(frozen=True)
class CaptionOptions:
    """What `caption_folder` does: which captioner, with which weights, and how captions are written."""

    model: str = "coca"
    """"coca" (a sentence per image) or "clip-tags" (ranked phrases per category)."""
    arch: str | None = None
    """open_clip architecture name; by default the one in `DEFAULT_WEIGHTS` for `model`."""
    pretrained: str | None = None
    """Weights: a local file, or an open_clip pretrained tag for `arch`; by default `DEFAULT_WEIGHTS`."""
    prefix: str = ""
    """Put first in every caption, e.g. a trigger word: "sks style"."""
    mode: str = "skip"
    """For images that already have a caption: "skip" them, "overwrite" the caption, or "append" to it."""
    metadata_csv: Path | None = None
    """Also write every caption of the folder to this `filename,prompt` csv (an old one is kept as `.bak`)."""
    batch_size: int = 8
    """Images per model call."""
    device: str | None = None
    """"cuda", "cpu", ...; by default CUDA when available."""
    decoding: CocaDecoding = field(default_factory=CocaDecoding)
    """How CoCa picks its words (CoCa only)."""

    def __post_init__(self) -> None:
        if self.model not in DEFAULT_WEIGHTS:
            raise UserError(f"Unknown captioner {self.model!r}; use one of {', '.join(DEFAULT_WEIGHTS)}.")
        if self.mode not in CAPTION_MODES:
            raise UserError(f"Unknown caption mode {self.mode!r}; use one of {', '.join(CAPTION_MODES)}.")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {self.batch_size}.")

    def weights(self) -> tuple[str, str]:
        """(architecture, pretrained) after defaults."""
        default_arch, default_pretrained = DEFAULT_WEIGHTS[self.model]
        return self.arch or default_arch, self.pretrained or default_pretrained


@dataclass(frozen=True)
class FailedImage:
    """An image that got no caption, and why."""

    path: Path
    reason: str


@dataclass
class CaptionReport:
    """What `caption_folder` did with each image."""

    captioned: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    """Images left alone because they already had a caption, in a caption file or the csv (mode "skip")."""
    failed: list[FailedImage] = field(default_factory=list)
    stopped: bool = False
    """True when `should_stop` ended the run before every image was seen."""
    metadata_csv: Path | None = None
    metadata_backup: Path | None = None
    """Where the csv that `metadata_csv` replaced was kept, when it held other captions."""

    def summary(self) -> str:
        """A line for people, then one line per failed image with the reason."""
        line = (
            f"Captioned {len(self.captioned)}, skipped {len(self.skipped)} (already captioned), "
            f"failed {len(self.failed)}."
        )
        if self.stopped:
            line += " Stopped before the end."
        if self.metadata_csv is not None:
            kept = f" (the old one is kept as {self.metadata_backup})" if self.metadata_backup else ""
            line += f" Wrote {self.metadata_csv}{kept}."
        return "\n".join([line, *(f"  {failure.path}: {failure.reason}" for failure in self.failed)])


def load_captioner(options: CaptionOptions) -> Captioner:
    """The captioner `options` name, with its weights loaded on its device."""
    arch, pretrained = options.weights()
    bundle = load_open_clip(arch, pretrained, resolve_device(options.device))
    if options.model == "coca":
        return CocaCaptioner(bundle, options.decoding)
    return ClipTagger(bundle)


def caption_folder(
    folder: Path,
    options: CaptionOptions,
    progress: Callable[[int, int, Path], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    captioner: Captioner | None = None,
) -> CaptionReport:
    """Write a caption beside every image below `folder` (recursively), as `options` say.

    An image's existing caption is the one training would use: its caption file, else its row in
    `options.metadata_csv` or the folder's `metadata.csv`. Two images that share a caption file (`x.png`,
    `x.jpg`) cannot both get their own caption: the second is listed as failed, with the reason.
    `progress(done, total, image_path)` is called after each image; `should_stop()` is asked before each
    batch. Unreadable images are listed in the report and the run goes on. `captioner` reuses a loaded
    one; by default the one `options` name is loaded, and only if some image needs a caption.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"Image folder {folder} does not exist or is not a folder. Check the path.")
    image_paths = image_files(folder.resolve())
    metadata = _metadata_captions(folder.resolve(), options.metadata_csv)
    report = CaptionReport()
    captions: dict[Path, str] = {}
    pending: list[tuple[Path, str]] = []
    done = 0

    def count_done(image_path: Path) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(image_paths), image_path)

    writers: dict[Path, Path] = {}  # caption file -> the image that will write it
    for image_path in image_paths:
        try:
            existing = existing_caption(image_path, CAPTION_EXTENSION, metadata)
        except UnreadableImage:
            report.failed.append(FailedImage(image_path, "its caption file is not UTF-8 text"))
            count_done(image_path)
            continue
        if existing:
            captions[image_path] = existing
        if existing and options.mode == "skip":
            report.skipped.append(image_path)
            count_done(image_path)
        elif (writer := writers.setdefault(caption_path(image_path), image_path)) != image_path:
            report.failed.append(FailedImage(image_path, f"it shares the caption file {caption_path(image_path).name} "
                                             f"with {writer.name}; rename one of them to caption both"))
            count_done(image_path)
        else:
            pending.append((image_path, existing))

    for batch in _batches(pending, options.batch_size):
        if should_stop is not None and should_stop():
            report.stopped = True
            break
        readable: list[tuple[Path, str, Image.Image]] = []
        for image_path, existing in batch:
            try:
                readable.append((image_path, existing, load_rgb_image(image_path)))
            except UnreadableImage as error:
                report.failed.append(FailedImage(image_path, str(error)))
                count_done(image_path)
        if not readable:
            continue
        if captioner is None:
            captioner = load_captioner(options)
        generated = captioner.caption([image for _, _, image in readable])
        for (image_path, existing, _), text in zip(readable, generated, strict=True):
            appended_to = existing if options.mode == "append" else ""
            captions[image_path] = compose_caption(text, options.prefix, appended_to)
            write_caption(image_path, captions[image_path])
            report.captioned.append(image_path)
            count_done(image_path)

    if options.metadata_csv is not None:
        report.metadata_csv, report.metadata_backup = write_metadata_csv(options.metadata_csv, captions)
    return report


def _metadata_captions(folder: Path, metadata_csv: Path | None) -> MetadataCaptions:
    """The csv captions training would fall back on: `metadata_csv` if it exists, else the folder's own."""
    for candidate in (metadata_csv, folder / METADATA_FILENAME):
        if candidate is not None and Path(candidate).is_file():
            return read_metadata(Path(candidate), folder)[0]
    return MetadataCaptions()


def _batches(items: list[tuple[Path, str]], batch_size: int) -> Iterator[list[tuple[Path, str]]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]
