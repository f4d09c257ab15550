"""caption_folder: captions land beside the images, modes and prefix apply, bad images are listed, runs stop cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.caption import CaptionOptions, CocaDecoding, caption_folder
from lora_trainer.caption.writer import read_caption
from lora_trainer.data.scan import scan_dataset
from lora_trainer.errors import UserError
from tests.caption_models import TINY_COCA, register_tiny_configs, save_tiny_checkpoint


class SizeCaptioner:
    """Captions each image with its size, and counts its calls."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.fail_on_call = fail_on_call

    def caption(self, images: list[Image.Image]) -> list[str]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("out of memory")
        return [f"a {image.width}x{image.height} picture" for image in images]


def make_image(path: Path, size: tuple[int, int] = (16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 100, 50)).save(path)
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_every_image_gets_a_caption_file_beside_it_in_subfolders_too(tmp_path: Path) -> None:
    images = [make_image(tmp_path / "a.png"), make_image(tmp_path / "10_sks" / "b.jpg", (20, 10))]

    report = caption_folder(tmp_path, CaptionOptions(), captioner=SizeCaptioner())

    assert read_caption(images[0]) == "a 16x12 picture"
    assert read_caption(images[1]) == "a 20x10 picture"
    assert sorted(report.captioned) == sorted(path.resolve() for path in images)


def test_prefix_goes_first(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.png")
    caption_folder(tmp_path, CaptionOptions(prefix="sks style, "), captioner=SizeCaptioner())
    assert read_caption(image) == "sks style, a 16x12 picture"


def test_skip_mode_leaves_existing_captions_alone(tmp_path: Path) -> None:
    captioned, blank, new = (make_image(tmp_path / name) for name in ("a.png", "b.png", "c.png"))
    write_text(tmp_path / "a.txt", "my own caption")
    write_text(tmp_path / "b.txt", "  \n")

    report = caption_folder(tmp_path, CaptionOptions(mode="skip"), captioner=SizeCaptioner())

    assert read_caption(captioned) == "my own caption"
    assert read_caption(blank) == read_caption(new) == "a 16x12 picture"
    assert report.skipped == [captioned.resolve()]


def test_overwrite_mode_replaces_existing_captions(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.png")
    write_text(tmp_path / "a.txt", "my own caption")
    caption_folder(tmp_path, CaptionOptions(mode="overwrite", prefix="sks"), captioner=SizeCaptioner())
    assert read_caption(image) == "sks, a 16x12 picture"


def test_append_mode_adds_to_existing_captions(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.png")
    write_text(tmp_path / "a.txt", "sks, my own caption")
    caption_folder(tmp_path, CaptionOptions(mode="append", prefix="sks"), captioner=SizeCaptioner())
    assert read_caption(image) == "sks, my own caption, a 16x12 picture"


def test_unreadable_images_are_listed_with_the_reason_and_the_run_goes_on(tmp_path: Path) -> None:
    good_before, good_after = make_image(tmp_path / "a.png"), make_image(tmp_path / "c.png")
    (tmp_path / "b.png").write_bytes(b"not a png at all")
    (tmp_path / "empty.jpg").write_bytes(b"")

    report = caption_folder(tmp_path, CaptionOptions(batch_size=2), captioner=SizeCaptioner())

    assert sorted(report.captioned) == [good_before.resolve(), good_after.resolve()]
    assert {failure.path.name: failure.reason for failure in report.failed} == {
        "b.png": "not an image Pillow can read",
        "empty.jpg": "empty file (0 bytes)",
    }
    assert not (tmp_path / "b.txt").exists()
    assert "b.png: not an image Pillow can read" in report.summary()


def test_an_image_whose_caption_file_is_not_utf8_is_listed_and_its_file_kept(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 latte")

    report = caption_folder(tmp_path, CaptionOptions(mode="append"), captioner=SizeCaptioner())

    assert [(failure.path.name, failure.reason) for failure in report.failed] == [
        ("a.png", "its caption file is not UTF-8 text")
    ]
    assert (tmp_path / "a.txt").read_bytes() == b"caf\xe9 latte"


def test_progress_is_reported_for_every_image(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        make_image(tmp_path / name)
    write_text(tmp_path / "a.txt", "done before")
    seen: list[tuple[int, int, str]] = []

    caption_folder(
        tmp_path,
        CaptionOptions(batch_size=1),
        progress=lambda done, total, path: seen.append((done, total, path.name)),
        captioner=SizeCaptioner(),
    )

    assert seen == [(1, 3, "a.png"), (2, 3, "b.png"), (3, 3, "c.png")]


def test_should_stop_ends_the_run_between_batches(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        make_image(tmp_path / name)
    captioner = SizeCaptioner()

    report = caption_folder(
        tmp_path, CaptionOptions(batch_size=2), should_stop=lambda: captioner.calls >= 1, captioner=captioner
    )

    assert report.stopped
    assert [path.name for path in report.captioned] == ["a.png", "b.png"]
    assert not (tmp_path / "c.txt").exists()


def test_an_error_mid_run_leaves_only_whole_caption_files(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png", "d.png"):
        make_image(tmp_path / name)

    with pytest.raises(RuntimeError, match="out of memory"):
        caption_folder(tmp_path, CaptionOptions(batch_size=2), captioner=SizeCaptioner(fail_on_call=2))

    assert sorted(path.name for path in tmp_path.iterdir() if path.suffix != ".png") == ["a.txt", "b.txt"]
    assert read_caption(tmp_path / "a.png") == "a 16x12 picture"


def test_no_model_is_loaded_when_every_image_already_has_a_caption(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    write_text(tmp_path / "a.txt", "my own caption")
    options = CaptionOptions(arch="no-such-architecture")
    report = caption_folder(tmp_path, options)
    assert report.skipped and not report.captioned


def test_metadata_csv_holds_new_and_kept_captions_and_the_loader_reads_it(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "5_sks" / "b.png")
    write_text(tmp_path / "a.txt", "my own caption")
    options = CaptionOptions(prefix="sks", metadata_csv=tmp_path / "metadata.csv")

    report = caption_folder(tmp_path, options, captioner=SizeCaptioner())
    for caption_file in tmp_path.rglob("*.txt"):
        caption_file.unlink()
    scan = scan_dataset(tmp_path, report.metadata_csv)

    assert {record.path.name: record.caption for record in scan.records} == {
        "a.png": "my own caption",
        "b.png": "sks, a 16x12 picture",
    }


def test_skip_mode_skips_images_captioned_in_the_folders_metadata_csv(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    write_text(tmp_path / "metadata.csv", "filename,prompt\na.png,my hand-written caption\n")

    report = caption_folder(tmp_path, CaptionOptions(mode="skip"), captioner=SizeCaptioner())

    assert [path.name for path in report.skipped] == ["a.png"]
    assert [path.name for path in report.captioned] == ["b.png"]
    assert not (tmp_path / "a.txt").exists()
    assert {record.path.name: record.caption for record in scan_dataset(tmp_path).records} == {
        "a.png": "my hand-written caption", "b.png": "a 16x12 picture"}


def test_rewriting_the_datasets_own_csv_keeps_its_captions_and_the_old_file(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    old_csv = "filename,prompt\na.png,my hand-written caption\n"
    write_text(tmp_path / "metadata.csv", old_csv)

    report = caption_folder(tmp_path, CaptionOptions(metadata_csv=tmp_path / "metadata.csv"),
                            captioner=SizeCaptioner())

    assert report.metadata_backup == tmp_path / "metadata.csv.bak"
    assert report.metadata_backup.read_text(encoding="utf-8") == old_csv
    assert f"the old one is kept as {report.metadata_backup}" in report.summary()
    for caption_file in tmp_path.glob("*.txt"):
        caption_file.unlink()
    assert {record.path.name: record.caption for record in scan_dataset(tmp_path).records} == {
        "a.png": "my hand-written caption", "b.png": "a 16x12 picture"}


def test_two_images_sharing_one_caption_file_are_not_both_reported_captioned(tmp_path: Path) -> None:
    make_image(tmp_path / "x.jpg", (20, 10))
    make_image(tmp_path / "x.png")

    report = caption_folder(tmp_path, CaptionOptions(mode="overwrite"), captioner=SizeCaptioner())

    assert [path.name for path in report.captioned] == ["x.jpg"]
    assert read_caption(tmp_path / "x.jpg") == "a 20x10 picture"
    assert [(failure.path.name, failure.reason) for failure in report.failed] == [
        ("x.png", "it shares the caption file x.txt with x.jpg; rename one of them to caption both")]


def test_a_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        caption_folder(tmp_path / "nowhere", CaptionOptions(), captioner=SizeCaptioner())


def test_coca_weights_from_a_file_caption_a_folder_end_to_end(tmp_path: Path) -> None:
    register_tiny_configs(tmp_path)
    checkpoint = save_tiny_checkpoint(TINY_COCA, tmp_path / "coca.pt")
    images = [make_image(tmp_path / "data" / name) for name in ("a.png", "b.png", "c.png")]
    options = CaptionOptions(
        arch=TINY_COCA,
        pretrained=str(checkpoint),
        prefix="sks",
        device="cpu",
        batch_size=2,
        decoding=CocaDecoding("beam", num_beams=2, max_tokens=5, min_tokens=2),
    )

    report = caption_folder(tmp_path / "data", options)

    assert len(report.captioned) == 3
    assert all(read_caption(image).startswith("sks, ") and len(read_caption(image)) > 5 for image in images)
