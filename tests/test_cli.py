"""The command line: train from a YAML config with overrides; user errors exit with code 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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
    out = capsys.readouterr().out
    assert "done: 2 steps in 0m" in out
    assert "Memory: ~" in out and "estimated peak" in out  # the plan line
    assert f"LoRA files: {tmp_path / 'out' / 'cli.safetensors'}" in out
    assert "in a prompt: <lora:cli:0.8>" in out


def test_an_unknown_config_key_exits_with_code_2_and_says_why(tmp_path, capsys):
    config = tmp_path / "my.yaml"
    config.write_text("lora_rnak: 4\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "did you mean 'lora_rank'" in capsys.readouterr().err


def test_train_without_data_or_model_says_what_is_missing(capsys):
    assert main(["train", "--lora_rank", "4"]) == 2
    assert "train_data_dir and base_model" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["output_dir", "logging_dir"])
def test_a_folder_to_write_that_is_a_file_is_refused_before_the_model_loads(key, shapes_dataset, tmp_path,
                                                                           monkeypatch, capsys):
    monkeypatch.setattr("lora_trainer.models.diffusers_backend.load_pipeline", _model_must_not_load)
    (tmp_path / "taken").write_text("a file, not a folder")
    arguments = ["train", "--train_data_dir", str(shapes_dataset), "--base_model", str(tmp_path / "model"),
                 "--output_dir", str(tmp_path / "out"), f"--{key}", str(tmp_path / "taken")]
    assert main(arguments) == 2
    assert f"{key} {tmp_path / 'taken'} is a file, not a folder" in capsys.readouterr().err


def test_a_missing_dataset_folder_is_reported_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lora_trainer.models.diffusers_backend.load_pipeline", _model_must_not_load)
    assert main(["train", "--train_data_dir", str(tmp_path / "nowhere"), "--base_model", str(tmp_path / "model"),
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert f"train_data_dir {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(("device", "message"), [("cuda", "Device cuda was asked for, but this PyTorch sees no CUDA"),
                                                 ("tpu", "Unknown device 'tpu'. Use cuda, cuda:N or cpu.")])
def test_a_device_this_machine_lacks_is_refused_before_the_model_loads(device, message, shapes_dataset, tmp_path,
                                                                        monkeypatch, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr("lora_trainer.models.diffusers_backend.load_pipeline", _model_must_not_load)
    assert main(["train", "--train_data_dir", str(shapes_dataset), "--base_model", str(tmp_path / "model"),
                 "--output_dir", str(tmp_path / "out"), "--device", device]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", ".bin"])
def test_a_base_model_file_of_random_bytes_says_it_is_damaged(suffix, shapes_dataset, tmp_path, capsys):
    pytest.importorskip("diffusers")
    model = tmp_path / f"model{suffix}"
    model.write_bytes(bytes(range(256)) * 64)
    assert main(["train", "--train_data_dir", str(shapes_dataset), "--base_model", str(model),
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert f"{model} is not a readable {suffix} checkpoint" in capsys.readouterr().err


def test_a_damaged_resume_state_says_so(shapes_dataset, tmp_path, capsys):
    state = tmp_path / "lora-s000002.state"
    state.mkdir()
    (state / "training_state.pt").write_bytes(b"PK\x03\x04 half a zip file")
    config = _tiny_run_config(tmp_path, shapes_dataset, max_train_steps=2)
    assert main(["train", "--config", str(config), "--resume", str(state)]) == 2
    assert f"resume: {state / 'training_state.pt'} cannot be read" in capsys.readouterr().err


@pytest.mark.parametrize(("change", "message"), [
    (["--lora_rank", "8"], "does not match this run: rank differs"),
    # Its batch counts are in batches of another size: resuming would skip the wrong images.
    (["--batch_size", "1"], "batches held 2 images (batch_size x processes), this run's hold 1"),
], ids=["rank", "global-batch-size"])
def test_a_resume_state_of_another_rank_or_global_batch_size_says_what_differs(change, message, shapes_dataset,
                                                                                tmp_path, capsys):
    config = _tiny_run_config(tmp_path, shapes_dataset, max_train_steps=1, save_state="true")
    assert main(["train", "--config", str(config)]) == 0
    assert main(["train", "--config", str(config), "--output_name", "again", *change,
                 "--resume", str(tmp_path / "out" / "lora.state")]) == 2
    assert message in capsys.readouterr().err


def _model_must_not_load(*arguments, **options):
    raise AssertionError("the model was loaded before the paths were checked")


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
    assert "fp16" not in error  # an fp32 run: no advice about a precision it does not use
    assert bar_output.endswith("\n")


REPOSITORY = Path(__file__).resolve().parent.parent


def _tiny_run_config(tmp_path: Path, dataset: Path, **keys) -> Path:
    """A config for a tiny sd1 model built once per test; `keys` add to or replace its settings."""
    pytest.importorskip("diffusers")
    from lora_trainer.tiny import save_tiny_model

    model = tmp_path / "tiny"
    if not model.exists():
        save_tiny_model(model, "sd1")
    settings = dict(train_data_dir=dataset, base_model=model, resolution=32, bucket_step=8, lora_rank=4,
                    batch_size=2, max_train_steps=100000, output_dir=tmp_path / "out", logging_dir=None)
    settings.update(keys)
    config = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    config.write_text("".join(f"{key}: {'null' if value is None else value}\n" for key, value in settings.items()))
    return config


def _train_process(config: Path, *arguments: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lora_trainer", "train", "--config", str(config), *arguments],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPOSITORY)


def _wait_for(process: subprocess.Popen, line_part: str) -> None:
    """Read the process's stdout up to the first line containing `line_part`."""
    for line in process.stdout:
        if line_part in line:
            return


def _send(process: subprocess.Popen, signum: int) -> tuple[int, str]:
    """Send `signum`; return the exit code and stderr."""
    try:
        process.send_signal(signum)
        _, errors = process.communicate(timeout=120)
    finally:
        process.kill()
    return process.returncode, errors


def _lora_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_ctrl_c_saves_the_weights_and_exits_with_code_130_without_a_traceback(shapes_dataset, tmp_path):
    config = _tiny_run_config(tmp_path, shapes_dataset)
    process = _train_process(config)
    _wait_for(process, "steps over")
    time.sleep(2)
    returncode, errors = _send(process, signal.SIGINT)
    assert returncode == 130
    assert errors.rstrip().endswith("interrupted") and "Traceback" not in errors
    saved = [path.name for path in (tmp_path / "out").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("lora-interrupted-s")


def test_sigterm_saves_the_weights_like_ctrl_c_and_exits_with_code_143(shapes_dataset, tmp_path):
    config = _tiny_run_config(tmp_path, shapes_dataset)
    process = _train_process(config)
    _wait_for(process, "steps over")  # the plan, printed once the caches are filled, just before step 1
    time.sleep(2)
    returncode, errors = _send(process, signal.SIGTERM)
    assert returncode == 143
    assert errors.rstrip().endswith("terminated") and "Traceback" not in errors
    saved = [path.name for path in (tmp_path / "out").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("lora-interrupted-s")


def test_under_nohup_a_hangup_does_not_stop_the_run(shapes_dataset, tmp_path):
    config = _tiny_run_config(tmp_path, shapes_dataset)
    process = subprocess.Popen([sys.executable, "-m", "lora_trainer", "train", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPOSITORY,
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    _wait_for(process, "steps over")
    process.send_signal(signal.SIGHUP)
    time.sleep(2)
    returncode, errors = _send(process, signal.SIGINT)
    assert returncode == 130 and errors.rstrip().endswith("interrupted")


def test_a_run_resumed_after_ctrl_c_ends_with_the_same_final_file_bit_for_bit(shapes_dataset, tmp_path):
    settings = dict(max_train_steps=8, save_every_n_steps=2, save_state="true", log_every_n_steps=1)
    straight = _train_process(_tiny_run_config(tmp_path, shapes_dataset, output_dir=tmp_path / "straight",
                                               **settings))
    assert straight.communicate(timeout=300) and straight.returncode == 0
    config = _tiny_run_config(tmp_path, shapes_dataset, output_dir=tmp_path / "resumed", **settings)
    process = _train_process(config)
    _wait_for(process, "steps over")
    started = time.perf_counter()
    _wait_for(process, "saved")
    # Ctrl-C a third of a step after the save of step 2: during step 3's forward or backward pass.
    time.sleep((time.perf_counter() - started) / 6)
    returncode, errors = _send(process, signal.SIGINT)
    assert returncode == 130, errors
    [state] = (tmp_path / "resumed").glob("lora-interrupted-s*.state")

    resumed = subprocess.run([sys.executable, "-m", "lora_trainer", "train", "--config", str(config),
                              "--resume", str(state)], capture_output=True, text=True, cwd=REPOSITORY, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "done: 8 steps" in resumed.stdout and "last loss None" not in resumed.stdout
    final, expected = _lora_tensors(tmp_path / "resumed" / "lora.safetensors"), \
        _lora_tensors(tmp_path / "straight" / "lora.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[key], expected[key]) for key in expected)


def test_a_run_removes_the_temporary_files_that_killed_saves_left_in_its_output_folder(shapes_dataset, tmp_path):
    output_dir = tmp_path / "out"
    killed_writer = ("import sys, time; from pathlib import Path; from lora_trainer.files import atomic_write\n"
                     "atomic_write(Path(sys.argv[1]), lambda tmp: (print('writing', flush=True), time.sleep(600)))\n")
    for target in (output_dir / "old-s000002.safetensors", output_dir / "old-s000002.state" / "training_state.pt"):
        writer = subprocess.Popen([sys.executable, "-c", killed_writer, str(target)], stdout=subprocess.PIPE,
                                  text=True, cwd=REPOSITORY)
        _wait_for(writer, "writing")
        writer.send_signal(signal.SIGKILL)
        writer.communicate(timeout=60)
    leftovers = [*output_dir.glob(".*.tmp"), *output_dir.glob("*.state/.*.tmp")]
    assert len(leftovers) == 2
    an_hour_ago = time.time() - 3600
    for leftover in leftovers:
        os.utime(leftover, (an_hour_ago, an_hour_ago))
    (output_dir / ".my-notes.tmp").write_text("not written by the trainer")

    assert main(["train", "--config", str(_tiny_run_config(tmp_path, shapes_dataset, max_train_steps=1))]) == 0
    assert sorted(path.name for path in output_dir.iterdir()) == [".my-notes.tmp", "lora.safetensors"]


def test_caching_latents_shows_a_progress_bar(shapes_dataset, tmp_path, capsys):
    assert main(["train", "--config", str(_tiny_run_config(tmp_path, shapes_dataset, max_train_steps=1))]) == 0
    assert "Caching latents: 100%" in capsys.readouterr().err


def test_every_skipped_image_is_listed_in_a_file_the_run_names(shapes_dataset, tmp_path, capsys):
    for index in range(5):
        (shapes_dataset / f"broken{index}.png").write_bytes(b"not a png")
    config = _tiny_run_config(tmp_path, shapes_dataset, max_train_steps=1, logging_dir=tmp_path / "logs")
    assert main(["train", "--config", str(config)]) == 0
    skipped_list = tmp_path / "logs" / "lora-skipped.txt"
    assert f"and 2 more (all of them listed in {skipped_list})" in capsys.readouterr().out
    assert [line.split(":")[0] for line in skipped_list.read_text().splitlines()] == [
        str((shapes_dataset / f"broken{index}.png").resolve()) for index in range(5)]
