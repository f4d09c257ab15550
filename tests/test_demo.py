"""The demo, the README's main job: trains end to end on the learned tiny base and writes its PNG."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lora_trainer.cli import main

pytest.importorskip("diffusers")


def test_the_demo_trains_a_lora_and_writes_samples_and_the_falling_loss_curve(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir), "--steps", "40"]) == 0
    lora = workdir / "lora" / "demo.safetensors"
    assert lora.is_file()
    losses = json.loads((workdir / "lora" / "losses.json").read_text())
    assert [step for step, _ in losses] == [10, 20, 30, 40]
    assert losses[-1][1] < losses[0][1]
    picture = Image.open(workdir / "demo.png")
    assert picture.width > 3 * 128 and picture.height > 2 * 128 + 160
    chart = picture.crop((0, picture.height - 160, picture.width, picture.height)).convert("RGB")
    assert (200, 40, 40) in {colour for _, colour in chart.getcolors(1 << 16)}
    out = capsys.readouterr().out
    assert "wrote" in out
    assert all(f"strength {strength}: magenta in" in out for strength in ("0", "0.5", "1"))

    # A second run reuses the trained file and draws the same picture again.
    before = lora.stat().st_mtime_ns
    assert main(["demo", "--workdir", str(workdir), "--steps", "40"]) == 0
    assert lora.stat().st_mtime_ns == before
    assert "from an earlier demo run" in capsys.readouterr().out
    assert Image.open(workdir / "demo.png").size == picture.size
