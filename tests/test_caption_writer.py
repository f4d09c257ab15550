"""Caption files: where they go, what goes in them, atomic writes, and metadata.csv the loader reads back."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.caption.writer import caption_path, compose_caption, read_caption, write_caption, write_metadata_csv
from lora_trainer.data.scan import scan_dataset


def make_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (90, 140, 200)).save(path)
    return path


def test_caption_file_sits_beside_the_image_with_the_same_stem() -> None:
    assert caption_path(Path("/data/10_sks/photo.01.png")) == Path("/data/10_sks/photo.01.txt")


def test_prefix_comes_first_whether_or_not_it_ends_with_a_comma() -> None:
    assert compose_caption("a cat on a sofa", "sks style, ") == "sks style, a cat on a sofa"
    assert compose_caption("a cat on a sofa", "sks style") == "sks style, a cat on a sofa"


def test_without_prefix_the_caption_is_the_generated_text() -> None:
    assert compose_caption(" a cat on a sofa ", "") == "a cat on a sofa"


def test_appending_keeps_the_existing_caption_before_the_new_text() -> None:
    assert compose_caption("oil painting", "", appended_to="a cat") == "a cat, oil painting"


def test_appending_puts_the_prefix_first_without_doubling_it() -> None:
    assert compose_caption("oil painting", "sks", appended_to="sks, a cat") == "sks, a cat, oil painting"
    assert compose_caption("oil painting", "sks", appended_to="a cat") == "sks, a cat, oil painting"


def test_read_caption_is_empty_without_a_caption_file(tmp_path: Path) -> None:
    image = make_image(tmp_path / "photo.png")
    assert read_caption(image) == ""
    write_caption(image, "a cat\n")
    assert read_caption(image) == "a cat"


def test_a_write_that_fails_midway_leaves_the_old_caption_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = make_image(tmp_path / "photo.png")
    write_caption(image, "the old caption")
    real_write_text = Path.write_text

    def write_half_then_fail(self: Path, text: str, *args, **kwargs) -> int:
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_caption(image, "a much longer new caption that never lands")
    monkeypatch.undo()
    assert read_caption(image) == "the old caption"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photo.png", "photo.txt"]


def test_metadata_csv_round_trips_through_the_dataset_loader(tmp_path: Path) -> None:
    captions = {
        make_image(tmp_path / "a.png"): 'sks, a "quoted" cat, on a sofa',
        make_image(tmp_path / "10_sks" / "b.jpg"): "sks, a dog",
        make_image(tmp_path / "10_sks" / "deeper" / "c.png"): "sks, ünïcödé, a bird",
    }
    csv_path, backup = write_metadata_csv(tmp_path / "metadata.csv", captions)

    scan = scan_dataset(tmp_path, csv_path)

    assert {record.path: record.caption for record in scan.records} == {
        path.resolve(): caption for path, caption in captions.items()
    }
    assert csv_path.read_text(encoding="utf-8").splitlines()[0] == "filename,prompt"
    assert backup is None
