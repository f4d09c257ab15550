"""scan_dataset: which images train, with which caption and repeats, and what is skipped and why."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.data.scan import DatasetScan, ImageRecord, scan_dataset
from lora_trainer.errors import UserError

OUTSIDE_REASON = "metadata.csv names a file outside the dataset folder; not read"


def make_image(path: Path, size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(path)
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as csv_file:
        csv.writer(csv_file).writerows(rows)
    return path


def captions_by_name(scan: DatasetScan) -> dict[str, str]:
    return {record.path.name: record.caption for record in scan.records}


def record(path: Path, caption: str = "", repeats: int = 1, subset: str = "") -> ImageRecord:
    return ImageRecord(path=path, caption=caption, repeats=repeats, subset=subset, width=16, height=16)


# --- the folder walk -----------------------------------------------------------------------------


def test_images_are_found_recursively_in_sorted_order(tmp_path):
    for relative in ["b.png", "a.png", "sub/deeper/d.png", "sub/c.jpg"]:
        make_image(tmp_path / relative)

    scan = scan_dataset(tmp_path)

    assert [record.path.relative_to(tmp_path).as_posix() for record in scan.records] == [
        "a.png",
        "b.png",
        "sub/c.jpg",
        "sub/deeper/d.png",
    ]


def test_record_paths_are_absolute(tmp_path, monkeypatch):
    make_image(tmp_path / "data" / "a.png")
    monkeypatch.chdir(tmp_path)

    scan = scan_dataset(Path("data"))

    assert scan.records[0].path == (tmp_path / "data" / "a.png").resolve()


def test_non_image_files_are_ignored_without_being_skipped(tmp_path):
    make_image(tmp_path / "a.png")
    write_text(tmp_path / "notes.md", "hello")
    write_text(tmp_path / "settings.json", "{}")

    scan = scan_dataset(tmp_path)

    assert [record.path.name for record in scan.records] == ["a.png"]
    assert scan.skipped == []


def test_hidden_files_and_folders_are_ignored(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / ".hidden.png")
    make_image(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png")

    scan = scan_dataset(tmp_path)

    assert [record.path.name for record in scan.records] == ["a.png"]


def test_size_is_the_upright_size_of_an_exif_rotated_image(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (32, 16)).save(tmp_path / "rotated.jpg", exif=exif.tobytes())

    scan = scan_dataset(tmp_path)

    assert (scan.records[0].width, scan.records[0].height) == (16, 32)


# --- repeats and subsets -------------------------------------------------------------------------


def test_kohya_folder_gives_its_repeat_count(tmp_path):
    make_image(tmp_path / "10_sks dog" / "a.png")

    scan = scan_dataset(tmp_path)

    assert scan.records[0].repeats == 10
    assert scan.records[0].subset == "10_sks dog"


def test_images_in_the_root_use_the_default_repeats_and_an_empty_subset(tmp_path):
    make_image(tmp_path / "a.png")

    scan = scan_dataset(tmp_path, default_repeats=3)

    assert scan.records[0].repeats == 3
    assert scan.records[0].subset == ""


def test_plain_folder_uses_the_default_repeats(tmp_path):
    make_image(tmp_path / "dogs" / "a.png")

    scan = scan_dataset(tmp_path, default_repeats=2)

    assert scan.records[0].repeats == 2


def test_zero_repeat_folder_uses_the_default_repeats(tmp_path):
    make_image(tmp_path / "0_dog" / "a.png")

    scan = scan_dataset(tmp_path, default_repeats=2)

    assert scan.records[0].repeats == 2


def test_images_nested_below_a_kohya_folder_get_its_repeats(tmp_path):
    make_image(tmp_path / "5_dog" / "close-ups" / "a.png")

    scan = scan_dataset(tmp_path)

    assert scan.records[0].repeats == 5
    assert scan.records[0].subset == "5_dog/close-ups"


def test_kohya_name_below_the_first_level_does_not_set_repeats(tmp_path):
    make_image(tmp_path / "dogs" / "7_big" / "a.png")

    scan = scan_dataset(tmp_path)

    assert scan.records[0].repeats == 1


def test_default_repeats_below_one_is_refused(tmp_path):
    make_image(tmp_path / "a.png")

    with pytest.raises(UserError, match="default_repeats"):
        scan_dataset(tmp_path, default_repeats=0)


# --- captions ------------------------------------------------------------------------------------


def test_caption_comes_from_the_text_file_beside_the_image_stripped(tmp_path):
    make_image(tmp_path / "a.png")
    write_text(tmp_path / "a.txt", "  sks dog, sitting \n")

    scan = scan_dataset(tmp_path)

    assert scan.records[0].caption == "sks dog, sitting"


def test_image_without_caption_has_an_empty_caption(tmp_path):
    make_image(tmp_path / "a.png")

    scan = scan_dataset(tmp_path)

    assert scan.records[0].caption == ""


def test_caption_extension_chooses_the_caption_file(tmp_path):
    make_image(tmp_path / "a.png")
    write_text(tmp_path / "a.txt", "from txt")
    write_text(tmp_path / "a.caption", "from caption")

    scan = scan_dataset(tmp_path, caption_extension=".caption")

    assert scan.records[0].caption == "from caption"


def test_caption_file_with_a_utf8_bom_is_read_without_it(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffsks dog".encode())

    scan = scan_dataset(tmp_path)

    assert scan.records[0].caption == "sks dog"


def test_image_with_a_caption_file_that_is_not_utf8_is_skipped(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 \xff")

    scan = scan_dataset(tmp_path)

    assert [record.path.name for record in scan.records] == ["b.png"]
    assert scan.skipped == [((tmp_path / "a.png").resolve(), "caption file a.txt is not UTF-8 text")]


def test_captions_come_from_metadata_csv_in_the_dataset_folder(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "sub" / "b.png")
    write_csv(tmp_path / "metadata.csv", [["filename", "prompt"], ["a.png", "a cat"], ["sub/b.png", "a dog"]])

    scan = scan_dataset(tmp_path)

    assert captions_by_name(scan) == {"a.png": "a cat", "b.png": "a dog"}


def test_metadata_csv_may_use_file_name_and_text_columns(tmp_path):
    make_image(tmp_path / "a.png")
    write_csv(tmp_path / "metadata.csv", [["file_name", "text"], ["a.png", "a cat"]])

    scan = scan_dataset(tmp_path)

    assert scan.records[0].caption == "a cat"


def test_metadata_csv_with_a_bom_and_extra_columns_is_read(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_bytes("\ufeffid,filename,prompt\n1,a.png,a cat\n".encode())

    scan = scan_dataset(tmp_path)

    assert scan.records[0].caption == "a cat"


def test_metadata_bare_file_name_matches_an_image_in_a_subfolder(tmp_path):
    make_image(tmp_path / "10_cat" / "a.png")
    write_csv(tmp_path / "metadata.csv", [["filename", "prompt"], ["a.png", "a cat"]])

    scan = scan_dataset(tmp_path)

    assert scan.records[0].caption == "a cat"


def test_metadata_path_relative_to_the_csv_picks_that_image_only(tmp_path):
    make_image(tmp_path / "one" / "a.png")
    make_image(tmp_path / "two" / "a.png")
    write_csv(tmp_path / "metadata.csv", [["filename", "prompt"], ["two/a.png", "the second"]])

    scan = scan_dataset(tmp_path)

    assert [record.caption for record in scan.records] == ["", "the second"]


def test_caption_file_wins_over_metadata_csv(tmp_path):
    make_image(tmp_path / "a.png")
    write_text(tmp_path / "a.txt", "from txt")
    write_csv(tmp_path / "metadata.csv", [["filename", "prompt"], ["a.png", "from csv"]])

    scan = scan_dataset(tmp_path)

    assert scan.records[0].caption == "from txt"


def test_metadata_path_may_point_to_a_csv_outside_the_dataset(tmp_path):
    dataset = tmp_path / "dataset"
    make_image(dataset / "a.png")
    csv_path = write_csv(tmp_path / "captions.csv", [["filename", "prompt"], ["a.png", "a cat"]])

    scan = scan_dataset(dataset, metadata_path=csv_path)

    assert scan.records[0].caption == "a cat"


def test_metadata_row_escaping_the_dataset_with_dot_dot_is_skipped(tmp_path):
    dataset = tmp_path / "dataset"
    make_image(dataset / "a.png")
    make_image(tmp_path / "secret.png")
    write_csv(dataset / "metadata.csv", [["filename", "prompt"], ["../secret.png", "stolen"]])

    scan = scan_dataset(dataset)

    assert [record.path.name for record in scan.records] == ["a.png"]
    assert scan.skipped == [(Path("../secret.png"), OUTSIDE_REASON)]


def test_metadata_row_with_an_absolute_path_outside_the_dataset_is_skipped(tmp_path):
    dataset = tmp_path / "dataset"
    make_image(dataset / "a.png")
    outside = make_image(tmp_path / "secret.png")
    write_csv(dataset / "metadata.csv", [["filename", "prompt"], [str(outside), "stolen"]])

    scan = scan_dataset(dataset)

    assert [record.path.name for record in scan.records] == ["a.png"]
    assert [reason for _, reason in scan.skipped] == [OUTSIDE_REASON]


def test_metadata_row_with_an_absolute_path_inside_the_dataset_is_used(tmp_path):
    image = make_image(tmp_path / "sub" / "a.png")
    write_csv(tmp_path / "metadata.csv", [["filename", "prompt"], [str(image.resolve()), "a cat"]])

    scan = scan_dataset(tmp_path)

    assert scan.records[0].caption == "a cat"


def test_missing_metadata_path_is_a_user_error(tmp_path):
    make_image(tmp_path / "a.png")

    with pytest.raises(UserError, match="does not exist"):
        scan_dataset(tmp_path, metadata_path=tmp_path / "nope.csv")


def test_metadata_without_the_expected_columns_names_found_and_expected(tmp_path):
    make_image(tmp_path / "a.png")
    write_csv(tmp_path / "metadata.csv", [["image", "caption"], ["a.png", "a cat"]])

    with pytest.raises(UserError) as raised:
        scan_dataset(tmp_path)

    assert "found: image, caption" in str(raised.value)
    assert "filename,prompt" in str(raised.value)


def test_empty_metadata_file_is_a_user_error(tmp_path):
    make_image(tmp_path / "a.png")
    write_text(tmp_path / "metadata.csv", "")

    with pytest.raises(UserError, match="found: none"):
        scan_dataset(tmp_path)


def test_metadata_that_is_not_utf8_is_a_user_error(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_bytes(b"filename,prompt\na.png,caf\xe9\n")

    with pytest.raises(UserError, match="UTF-8"):
        scan_dataset(tmp_path)


# --- unreadable images and user errors -----------------------------------------------------------


def test_unreadable_images_are_skipped_with_their_reason(tmp_path):
    make_image(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    write_text(tmp_path / "text.png", "not an image")

    scan = scan_dataset(tmp_path)

    assert [record.path.name for record in scan.records] == ["good.png"]
    assert [(path.name, reason) for path, reason in scan.skipped] == [
        ("empty.png", "empty file (0 bytes)"),
        ("text.png", "not an image Pillow can read"),
    ]


def test_truncated_image_is_skipped(tmp_path):
    make_image(tmp_path / "good.png")
    Image.effect_noise((32, 32), 64).save(tmp_path / "cut.jpg", quality=95)
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])

    scan = scan_dataset(tmp_path)

    assert [path.name for path, _ in scan.skipped] == ["cut.jpg"]


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


def test_file_given_as_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        scan_dataset(make_image(tmp_path / "a.png"))


def test_folder_without_images_is_a_user_error(tmp_path):
    write_text(tmp_path / "a.txt", "a caption without its image")

    with pytest.raises(UserError, match="No images found"):
        scan_dataset(tmp_path)


def test_folder_of_only_unreadable_images_says_how_many_and_why(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")

    with pytest.raises(UserError) as raised:
        scan_dataset(tmp_path)

    assert "No usable images" in str(raised.value)
    assert "2 skipped" in str(raised.value)
    assert "a.png: empty file (0 bytes)" in str(raised.value)


# --- tag frequency and summary -------------------------------------------------------------------


def test_tag_frequency_counts_stripped_tags_per_subset(tmp_path):
    scan = DatasetScan(
        records=[
            record(tmp_path / "a.png", "sks dog,  sitting, ,", subset="10_sks dog"),
            record(tmp_path / "b.png", "sks dog, running", subset="10_sks dog"),
            record(tmp_path / "c.png", "", subset=""),
        ],
        skipped=[],
    )

    assert scan.tag_frequency() == {"10_sks dog": {"sks dog": 2, "sitting": 1, "running": 1}, "": {}}


def test_tag_frequency_of_a_scanned_kohya_folder_is_keyed_by_the_folder_name(tmp_path):
    make_image(tmp_path / "10_sks dog" / "a.png")
    write_text(tmp_path / "10_sks dog" / "a.txt", "sks dog, grass")

    scan = scan_dataset(tmp_path)

    assert scan.tag_frequency() == {"10_sks dog": {"sks dog": 1, "grass": 1}}


def test_summary_counts_images_and_folders(tmp_path):
    records = [record(tmp_path / "a.png"), record(tmp_path / "b.png", subset="5_x")]
    scan = DatasetScan(records=records, skipped=[])

    assert scan.summary() == "2 images in 2 folders."


def test_summary_lists_the_first_skipped_files_and_counts_the_rest(tmp_path):
    skipped = [(tmp_path / f"bad{index}.png", "empty file (0 bytes)") for index in range(5)]
    scan = DatasetScan(records=[record(tmp_path / "a.png")], skipped=skipped)

    assert scan.summary() == (
        "1 image in 1 folder, 5 skipped.\n"
        "Skipped bad0.png: empty file (0 bytes); bad1.png: empty file (0 bytes); "
        "bad2.png: empty file (0 bytes); and 2 more."
    )


def test_symlinked_subfolders_are_scanned_and_a_link_back_up_the_tree_is_not_followed(tmp_path):
    dataset, elsewhere = tmp_path / "dataset", tmp_path / "elsewhere"
    make_image(dataset / "a.png")
    make_image(elsewhere / "b.png")
    try:
        (dataset / "5_linked").symlink_to(elsewhere, target_is_directory=True)
        (elsewhere / "loop").symlink_to(dataset, target_is_directory=True)
    except OSError:
        pytest.skip("this file system cannot hold symlinks")

    scan = scan_dataset(dataset)

    assert [(record.path.name, record.repeats) for record in scan.records] == [("a.png", 1), ("b.png", 5)]
