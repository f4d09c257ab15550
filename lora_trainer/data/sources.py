"""Where a run's images come from: the dataset folder or its subsets, the regularisation images and the
held-out validation images, each scanned once."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from lora_trainer.config import DatasetConfig, SubsetConfig
from lora_trainer.data.scan import DatasetScan, ImageRecord, scan_dataset
from lora_trainer.errors import UserError


@dataclass
class ImageSources:
    """The training images (with what was skipped), the regularisation images and the held-out images."""

    scan: DatasetScan
    reg_records: list[ImageRecord]
    held_out: list[ImageRecord]


def gather_images(dataset: DatasetConfig, seed: int) -> ImageSources:
    """Scan every folder `dataset` names. Subset images carry their subset's options (the dataset's where the
    subset leaves one out); `validation_split` holds out a share of the training images chosen by `seed`."""
    if dataset.train_data_dir is None and not any(not subset.is_reg for subset in dataset.subsets):
        raise UserError("no training images: set train_data_dir, or subsets with at least one that is not is_reg")
    records, skipped, reg_records = [], [], []
    if dataset.train_data_dir is not None:
        scan = scan_dataset(dataset.train_data_dir, dataset.metadata_path, dataset.repeats,
                            dataset.caption_extension)
        records, skipped = scan.records, scan.skipped
    for subset in dataset.subsets:
        options = _resolved(subset, dataset)
        scan = scan_dataset(subset.image_dir, None, subset.repeats, options.caption_extension)
        subset_records = [replace(record, subset=_subset_name(subset.image_dir, record.subset),
                                  subset_options=options, is_reg=subset.is_reg) for record in scan.records]
        (reg_records if subset.is_reg else records).extend(subset_records)
        skipped.extend(scan.skipped)
    if dataset.reg_data_dir is not None:
        reg_records += [replace(record, is_reg=True) for record in
                        scan_dataset(dataset.reg_data_dir, caption_extension=dataset.caption_extension).records]
    held_out: list[ImageRecord] = []
    if dataset.validation_data_dir is not None:
        held_out = scan_dataset(dataset.validation_data_dir, caption_extension=dataset.caption_extension).records
    elif dataset.validation_split:
        records, held_out = split_validation(records, dataset.validation_split, seed)
    return ImageSources(DatasetScan(records, skipped), reg_records, held_out)


def split_validation(records: list[ImageRecord], share: float, seed: int) -> tuple[list[ImageRecord],
                                                                                      list[ImageRecord]]:
    """(training, held-out) records: `share` of the images (at least one, chosen by `seed`) held out."""
    if len(records) < 2:
        raise UserError(f"validation_split needs at least 2 images to hold one out; the dataset has {len(records)}")
    count = min(len(records) - 1, max(1, round(share * len(records))))
    held_out = set(random.Random(f"{seed}-validation").sample(range(len(records)), count))
    return ([record for index, record in enumerate(records) if index not in held_out],
            [record for index, record in enumerate(records) if index in held_out])


def _resolved(subset: SubsetConfig, dataset: DatasetConfig) -> SubsetConfig:
    """`subset` with every option it leaves out taken from `dataset`."""
    inherited = ("caption_extension", "keep_tokens", "shuffle_caption", "caption_dropout_rate", "flip_aug")
    return replace(subset, **{name: getattr(dataset, name) for name in inherited if getattr(subset, name) is None})


def _subset_name(image_dir: Path, inner: str) -> str:
    """A subset image's folder as metadata names it: the subset folder's name, then the folder inside it."""
    return "/".join(part for part in (Path(image_dir).name, inner) if part)
