"""The caption command: arguments to options, captions on disk, a summary that lists what failed."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.caption.cli import add_arguments, run
from lora_trainer.errors import UserError
from tests.caption_models import TINY_CLIP, register_tiny_configs, save_tiny_checkpoint


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="caption")
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_caption_with_coca_and_skip_existing_captions() -> None:
    args = parse("images")
    assert (args.model, args.mode, args.prefix, args.decoding) == ("coca", "skip", "", "beam")


def test_clip_tags_from_a_weights_file_caption_the_folder_and_print_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    register_tiny_configs(tmp_path)
    checkpoint = save_tiny_checkpoint(TINY_CLIP, tmp_path / "clip.pt")
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 20), (30, 90, 200)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")

    exit_code = run(
        parse(
            str(folder),
            "--model", "clip-tags",
            "--arch", TINY_CLIP,
            "--pretrained", str(checkpoint),
            "--prefix", "sks style, ",
            "--metadata-csv", str(folder / "metadata.csv"),
            "--device", "cpu",
        )
    )  # fmt: skip

    assert exit_code == 0
    assert (folder / "a.txt").read_text(encoding="utf-8").startswith("sks style, ")
    assert (folder / "metadata.csv").is_file()
    summary = capsys.readouterr().out
    assert "Captioned 2, skipped 0 (already captioned), failed 1." in summary
    assert "broken.jpg: not an image Pillow can read" in summary


def test_a_missing_weights_file_is_a_user_error(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="does not exist"):
        run(parse(str(tmp_path), "--pretrained", str(tmp_path / "missing.pt"), "--device", "cpu"))


def test_an_unknown_pretrained_tag_lists_the_known_ones_without_downloading(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="mscoco_finetuned_laion2b_s13b_b90k"):
        run(parse(str(tmp_path), "--pretrained", "no_such_tag", "--device", "cpu"))
