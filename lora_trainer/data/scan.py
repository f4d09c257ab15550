"""Dataset scan: find the training images, their captions and repeats, and what had to be skipped."""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.config import SubsetConfig
from lora_trainer.data.images import UnreadableImage, is_image_file, load_rgb_image
from lora_trainer.data.masks import is_mask_file
from lora_trainer.errors import UserError
from lora_trainer.files import atomic_write_text

METADATA_FILENAME = "metadata.csv"
_FILENAME_COLUMNS = ("filename", "file_name")
_CAPTION_COLUMNS = ("prompt", "text")
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
_SKIPPED_SHOWN = 3


@dataclass(frozen=True)
class ImageRecord:
    """One usable training image."""

    path: Path
    """Absolute path of the image file."""
    caption: str
    """Caption, stripped; "" when the image has none."""
    repeats: int
    """How often the image is seen per epoch: N from a kohya `N_name` folder, else the default."""
    subset: str
    """Folder of the image relative to the dataset folder, "/"-separated; "" for the dataset folder itself."""
    width: int
    """Width after EXIF rotation."""
    height: int
    """Height after EXIF rotation."""
    is_reg: bool = False
    """A regularisation image (from `reg_data_dir` or an `is_reg` subset), not a training image."""
    subset_options: SubsetConfig | None = None
    """The options of the dataset subset the image is in (every one set), or None outside subsets."""


@dataclass
class DatasetScan:
    """The result of `scan_dataset`: usable images and the files left out, with why."""

    records: list[ImageRecord]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_tag_frequency`: per subset folder, how often each comma-separated tag occurs."""
        frequency: dict[str, Counter[str]] = {}
        for record in self.records:
            tags = (tag.strip() for tag in record.caption.split(","))
            frequency.setdefault(record.subset, Counter()).update(tag for tag in tags if tag)
        return {subset: dict(counts) for subset, counts in frequency.items()}

    def summary(self, skipped_list: Path | None = None) -> str:
        """One or two lines for people: how many images in how many folders, and what was skipped (all of it
        in `skipped_list`, when given: see `write_skipped_list`)."""
        folder_count = len({record.subset for record in self.records})
        line = f"{_count(len(self.records), 'image')} in {_count(folder_count, 'folder')}"
        if not self.skipped:
            return line + "."
        described = _describe_skipped(self.skipped)
        if skipped_list is not None:
            described = f"{described[:-1]} (all of them listed in {skipped_list})."
        return f"{line}, {len(self.skipped)} skipped.\n{described}"

    def write_skipped_list(self, path: Path) -> Path:
        """Write every skipped file with its reason, one a line, to `path` (replacing it); returns `path`."""
        return atomic_write_text(path, "".join(f"{file}: {reason}\n" for file, reason in self.skipped))


def scan_dataset(
    train_data_dir: Path,
    metadata_path: Path | None = None,
    default_repeats: int = 1,
    caption_extension: str = ".txt",
) -> DatasetScan:
    """Walk `train_data_dir` (recursively, in sorted order), open every image and collect its caption.

    Captions come from the caption file beside the image (`photo.txt` for `photo.png`), else from
    `metadata_path` (default: `metadata.csv` in `train_data_dir`, if there). Unreadable images are
    skipped with the reason. Raises `UserError` when the folder or metadata cannot be used or no image is.
    """
    if default_repeats < 1:
        raise UserError(f"default_repeats must be at least 1, got {default_repeats}.")
    dataset_dir = _checked_dataset_dir(train_data_dir)
    if metadata_path is None and (dataset_dir / METADATA_FILENAME).is_file():
        metadata_path = dataset_dir / METADATA_FILENAME
    metadata = MetadataCaptions()
    skipped: list[tuple[Path, str]] = []
    if metadata_path is not None:
        metadata, skipped = read_metadata(Path(metadata_path), dataset_dir)
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension

    records: list[ImageRecord] = []
    for image_path in image_files(dataset_dir):
        try:
            image = load_rgb_image(image_path)
            caption = existing_caption(image_path, caption_extension, metadata)
        except UnreadableImage as error:
            skipped.append((image_path, str(error)))
            continue
        subset = image_path.parent.relative_to(dataset_dir).as_posix()
        records.append(
            ImageRecord(
                path=image_path,
                caption=caption,
                repeats=_repeats_for(subset, default_repeats),
                subset="" if subset == "." else subset,
                width=image.width,
                height=image.height,
            )
        )
    if not records:
        raise _no_usable_images(dataset_dir, skipped)
    return DatasetScan(records=records, skipped=skipped)


def _checked_dataset_dir(train_data_dir: Path) -> Path:
    dataset_dir = Path(train_data_dir).expanduser()
    if not dataset_dir.exists():
        raise UserError(f"Training image folder {dataset_dir} does not exist. Check the path and try again.")
    if not dataset_dir.is_dir():
        raise UserError(
            f"{dataset_dir} is a file, not a folder. "
            "Set the training data folder to the folder that holds the images."
        )
    return dataset_dir.resolve()


def image_files(dataset_dir: Path) -> list[Path]:
    """Image files below `dataset_dir`, in sorted order, leaving out hidden files and folders and loss masks
    (`name.mask.png`). Symlinked
    folders are followed, each real folder once (a link back up the tree is not followed)."""
    found: list[Path] = []
    seen: set[str] = set()
    for folder, subfolders, filenames in os.walk(dataset_dir, followlinks=True):
        real_folder = os.path.realpath(folder)
        if real_folder in seen:
            subfolders[:] = []
            continue
        seen.add(real_folder)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found.extend(Path(folder, name) for name in sorted(filenames)
                     if is_image_file(Path(name)) and not is_mask_file(Path(name)))
    return found


def _repeats_for(subset: str, default_repeats: int) -> int:
    """N for images below a first-level kohya `N_name` folder, else `default_repeats`."""
    match = _KOHYA_FOLDER.match(subset.split("/")[0])
    if match and int(match.group(1)) > 0:
        return int(match.group(1))
    return default_repeats


def existing_caption(image_path: Path, caption_extension: str, metadata: MetadataCaptions) -> str:
    """The caption training uses for `image_path`: its caption file if there is one, else its `metadata` row.

    Raises `UnreadableImage` when the caption file is not UTF-8 text.
    """
    caption_path = image_path.with_suffix(caption_extension)
    if not caption_path.is_file():
        return metadata.caption_for(image_path)
    try:
        return caption_path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        raise UnreadableImage(f"caption file {caption_path.name} is not UTF-8 text") from None


@dataclass
class MetadataCaptions:
    """Captions from metadata.csv: by image path, and by bare file name for rows that give only a name."""

    by_path: dict[Path, str] = field(default_factory=dict)
    by_name: dict[str, str] = field(default_factory=dict)

    def caption_for(self, image_path: Path) -> str:
        """The csv's caption of `image_path`, stripped; "" when it has none."""
        caption = self.by_path.get(image_path, self.by_name.get(image_path.name, ""))
        return caption.strip()


def read_metadata(
    metadata_path: Path, dataset_dir: Path
) -> tuple[MetadataCaptions, list[tuple[Path, str]]]:
    """Captions from a `filename,prompt` (or `file_name,text`) csv whose names are relative to its folder.

    Rows naming a file outside `dataset_dir` are returned as skipped and never looked at.
    """
    rows = _read_csv_rows(metadata_path)
    filename_column, caption_column = _metadata_columns(rows[0] if rows else [], metadata_path)
    metadata = MetadataCaptions()
    skipped: list[tuple[Path, str]] = []
    csv_dir = metadata_path.resolve().parent
    for row in rows[1:]:
        if len(row) <= max(filename_column, caption_column) or not row[filename_column].strip():
            continue
        filename = row[filename_column].strip().replace("\\", "/")
        caption = row[caption_column]
        image_path = Path(os.path.normpath(csv_dir / filename))
        is_bare_name = "/" not in filename
        if is_bare_name:
            metadata.by_name[filename] = caption
        if image_path.is_relative_to(dataset_dir):
            metadata.by_path[image_path] = caption
        elif not is_bare_name:
            skipped.append(
                (Path(filename), f"{metadata_path.name} names a file outside the dataset folder; not read")
            )
    return metadata, skipped


def _read_csv_rows(metadata_path: Path) -> list[list[str]]:
    if not metadata_path.is_file():
        raise UserError(f"Metadata file {metadata_path} does not exist. Fix the path or leave it empty.")
    try:
        with metadata_path.open(encoding="utf-8-sig", newline="") as metadata_file:
            return list(csv.reader(metadata_file))
    except UnicodeDecodeError:
        raise UserError(
            f"Metadata file {metadata_path} is not UTF-8 text. Save it as UTF-8 and try again."
        ) from None
    except csv.Error as error:
        raise UserError(
            f"Metadata file {metadata_path} is not a valid csv file ({error}). Fix it and try again."
        ) from None


def _metadata_columns(header: list[str], metadata_path: Path) -> tuple[int, int]:
    """Indexes of the file name and caption columns in the csv header row."""
    column_names = [name.strip().lower() for name in header]
    filename_column = _first_column(column_names, _FILENAME_COLUMNS)
    caption_column = _first_column(column_names, _CAPTION_COLUMNS)
    if filename_column is None or caption_column is None:
        found = ", ".join(name.strip() for name in header) or "none"
        raise UserError(
            f"Metadata file {metadata_path} needs the columns filename,prompt (or file_name,text) in its "
            f"first row; found: {found}. Rename the header columns and try again."
        )
    return filename_column, caption_column


def _first_column(column_names: list[str], accepted_names: tuple[str, ...]) -> int | None:
    return next((column_names.index(name) for name in accepted_names if name in column_names), None)


def _no_usable_images(dataset_dir: Path, skipped: list[tuple[Path, str]]) -> UserError:
    if not skipped:
        return UserError(
            f"No images found in {dataset_dir}. Put the training images (.png, .jpg, .webp, ...) in it "
            "or in subfolders such as 10_name (10 repeats)."
        )
    return UserError(
        f"No usable images in {dataset_dir}: {len(skipped)} skipped. {_describe_skipped(skipped)} "
        "Replace or remove these files and try again."
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _describe_skipped(skipped: list[tuple[Path, str]]) -> str:
    """The first few skipped files with their reasons, on one line."""
    shown = "; ".join(f"{path.name}: {reason}" for path, reason in skipped[:_SKIPPED_SHOWN])
    hidden_count = len(skipped) - _SKIPPED_SHOWN
    return f"Skipped {shown}" + (f"; and {hidden_count} more." if hidden_count > 0 else ".")
