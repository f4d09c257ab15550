"""The command line: train from a YAML config with overrides; user errors exit with code 2."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_trainer.cli import main


def test_train_from_a_yaml_config_with_a_command_line_override(shapes_dataset, tmp_path, capsys):
    pytest.importorskip("diffusers")
    from lora_trainer.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny", "sd1")
    config = tmp_path / "my.yaml"
    config.write_text(f"train_data_dir: {shapes_dataset}\nbase_model: {model}\nresolution: 32\nbucket_step: 8\n"
                      f"lora_rank: 4\nmax_train_steps: 50\noutput_dir: {tmp_path / 'out'}\nlogging_dir: null\n")
    assert main(["train", "--config", str(config), "--max_train_steps", "2", "--output_name", "cli"]) == 0
    assert (tmp_path / "out" / "cli.safetensors").is_file()
    assert "done: 2 steps" in capsys.readouterr().out


def test_an_unknown_config_key_exits_with_code_2_and_says_why(tmp_path, capsys):
    config = tmp_path / "my.yaml"
    config.write_text("lora_rnak: 4\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "did you mean 'lora_rank'" in capsys.readouterr().err


def test_train_without_data_or_model_says_what_is_missing(capsys):
    assert main(["train", "--lora_rank", "4"]) == 2
    assert "train_data_dir and base_model" in capsys.readouterr().err


def test_a_run_that_fails_midway_ends_the_progress_bar_line_before_the_error(shapes_dataset, tmp_path, capsys):
    pytest.importorskip("diffusers")
    from lora_trainer.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny", "sd1")
    config = tmp_path / "my.yaml"
    # A huge learning rate without clipping: the loss becomes NaN at the second step and the run stops.
    config.write_text(f"train_data_dir: {shapes_dataset}\nbase_model: {model}\nresolution: 32\nbucket_step: 8\n"
                      f"lora_rank: 4\nmax_train_steps: 10\nlearning_rate: 1.0e+30\nmax_grad_norm: null\n"
                      f"log_every_n_steps: 1\noutput_dir: {tmp_path / 'out'}\nlogging_dir: null\n")
    assert main(["train", "--config", str(config)]) == 2
    bar_output, _, error = capsys.readouterr().err.partition("error: ")
    assert "the loss became" in error
    assert bar_output.endswith("\n")


def test_ctrl_c_saves_the_weights_and_exits_with_code_130_without_a_traceback(shapes_dataset, tmp_path):
    pytest.importorskip("diffusers")
    from lora_trainer.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny", "sd1")
    config = tmp_path / "my.yaml"
    config.write_text(f"train_data_dir: {shapes_dataset}\nbase_model: {model}\nresolution: 32\nbucket_step: 8\n"
                      f"lora_rank: 4\nmax_train_steps: 100000\noutput_dir: {tmp_path / 'out'}\nlogging_dir: null\n")
    process = subprocess.Popen([sys.executable, "-m", "lora_trainer", "train", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parent.parent)
    try:
        for line in process.stdout:  # the plan is printed once the caches are filled, just before step 1
            if "steps over" in line:
                break
        time.sleep(2)
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130
    assert errors.rstrip().endswith("interrupted") and "Traceback" not in errors
    saved = [path.name for path in (tmp_path / "out").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("lora-interrupted-s")
