"""Data-parallel training: two CPU processes (gloo) train the tiny model together (see launched.py)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import write_shapes_dataset
from launched import exit_code_of, read_safetensors, signal_the_second, start_processes

from lora_trainer.cli import main

pytest.importorskip("diffusers")


def _config(tmp_path: Path, **keys) -> Path:
    """A run of the tiny sd1 model on seven images (one bucket) with flips, caption shuffling and offset noise, so
    that the augmentation and noise streams matter; `keys` add to or replace its settings."""
    from lora_trainer.tiny import save_tiny_model

    model, dataset = tmp_path / "tiny", tmp_path / "dataset"
    if not model.exists():
        save_tiny_model(model, "sd1")
        write_shapes_dataset(dataset, count=7)
    settings = dict(train_data_dir=dataset, base_model=model, resolution=32, bucket_step=8, lora_rank=4,
                    learning_rate=1e-3, flip_aug="true", shuffle_caption="true", noise_offset=0.05,
                    gradient_accumulation_steps=2, max_train_steps=3, log_every_n_steps=1, device="cpu")
    settings.update(keys)
    config = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    config.write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))
    return config


def test_two_processes_train_the_same_lora_as_one_with_the_same_global_batch(tmp_path, capsys):
    # The VAE's latents are samples: the two processes each encode a share into the disk cache, which the
    # process alone then reads, so that both runs train on the same latents.
    two = _config(tmp_path, batch_size=2, output_dir=tmp_path / "two", logging_dir=tmp_path / "logs",
                  save_every_n_steps=2, cache_latents_to_disk="true")
    pids = start_processes(two, 2, tmp_path / "processes")
    exit_codes = [exit_code_of(pid, 300) for pid in pids]
    assert exit_codes == [0, 0], (tmp_path / "processes" / "rank-0.err").read_text()[-3000:]
    one = _config(tmp_path, batch_size=4, output_dir=tmp_path / "one", logging_dir="null",
                  cache_latents_to_disk="true")
    assert main(["train", "--config", str(one)]) == 0

    alone, together = (read_safetensors(tmp_path / name / "lora.safetensors") for name in ("one", "two"))
    assert alone.keys() == together.keys()
    # LoRA's up matrices start at zero: runs that learned nothing would match trivially.
    assert max(alone[key].abs().max().item() for key in alone if "lora_up" in key) > 1e-3
    # fp32 tolerance: the gradients are summed in another order, and Adam magnifies that where a gradient is
    # near zero (about 3e-5 on kohya's layer set, 2e-6 on attention alone); one flip or caption order drawn
    # differently moves the weights by about 6e-3.
    assert max((alone[key] - together[key]).abs().max().item() for key in alone) < 1e-4

    # Written once, by the main process: one summary, the files of one run, one log folder.
    outputs = [(tmp_path / "processes" / f"rank-{rank}.out").read_text() for rank in range(2)]
    assert "done: 3 steps" in outputs[0] and outputs[1] == ""
    # The latents were encoded once, each process taking its share: the main one 4 of the 7 images.
    assert "Latents: this process encoded 4 of the 7 images" in outputs[0]
    assert "Latents: 7 read from the disk cache, 0 encoded." in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == ["lora-s000002.safetensors",
                                                                           "lora.safetensors"]
    [log_folder] = (tmp_path / "logs").iterdir()
    assert len(list(log_folder.glob("events.out.tfevents.*"))) == 1

    # Each epoch (global batches of 4 and 3 images), the processes trained disjoint shares of all the images.
    epochs = [json.loads(line) for line in (log_folder / "shards.jsonl").read_text().splitlines()]
    images = sorted(str(path) for path in (tmp_path / "dataset").glob("*.png"))
    assert [epoch["epoch"] for epoch in epochs] == [1, 2, 3]
    for epoch in epochs:
        first, second = epoch["processes"]
        assert len(first) == 4 and len(second) == 3  # the 3-image batch: two rows and one
        assert sorted(first + second) == images


def test_a_ctrl_c_that_reaches_one_process_stops_both_and_the_main_one_saves(tmp_path):
    config = _config(tmp_path, batch_size=1, max_train_steps=100000, output_dir=tmp_path / "out",
                     logging_dir="null", save_state="true")
    exit_codes = signal_the_second(config, tmp_path / "processes", signal.SIGINT, 60)
    assert exit_codes == [130, 130], (tmp_path / "processes" / "rank-0.err").read_text()[-3000:]
    saved = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert len(saved) == 2 and saved[0].startswith("lora-interrupted-s") and saved[1].endswith(".state")
    # Without the disk cache the processes encoded a share of the latents each and gathered the rest.
    assert "Latents: this process encoded 4 of the 7 images, the other 1 process(es) the rest." in \
        (tmp_path / "processes" / "rank-0.out").read_text()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_when_one_process_dies_or_freezes_the_other_stops_with_a_clear_message(signum, tmp_path):
    timeout = 5
    config = _config(tmp_path, batch_size=1, max_train_steps=100000, output_dir=tmp_path / "out",
                     logging_dir="null", distributed_timeout_seconds=timeout)
    # A margin for a loaded machine, far from forever.
    exit_code, _ = signal_the_second(config, tmp_path / "processes", signum, timeout + 60)
    errors = (tmp_path / "processes" / "rank-0.err").read_text()
    assert exit_code == 2, errors[-3000:]
    assert "another training process died, or did not answer within distributed_timeout_seconds (5 s)" in errors
    assert "Traceback" not in errors
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32", "qlora"])
def test_two_processes_train_the_same_language_model_adapter_as_one_with_the_same_global_batch(tmp_path, four_bit):
    pytest.importorskip("peft")
    if four_bit:
        pytest.importorskip("bitsandbytes")
    from llm_models import COLOUR_TASK, save_tiny_llama, write_jsonl

    base = save_tiny_llama(tmp_path / "base")
    # Answers of one to three words: the sequences' trained tokens differ, which the processes' losses weigh.
    records = [dict(record, output=" ".join([record["output"]] * (1 + index % 3)))
               for index, record in enumerate(COLOUR_TASK.training_records())]
    data = write_jsonl(tmp_path / "colours.jsonl", records)

    def config(name: str, batch_size: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"task: llm\nbase_model: {base}\ntrain_data: {data}\noutput_dir: {tmp_path / name}\n"
                        f"logging_dir: null\nlora_dropout: 0.0\nlearning_rate: 1.0e-2\n"
                        f"batch_size: {batch_size}\ngradient_accumulation_steps: 2\nmax_train_steps: 3\n"
                        f"load_in_4bit: {str(four_bit).lower()}\n")
        return path

    pids = start_processes(config("two", 3), 2, tmp_path / "processes")
    exit_codes = [exit_code_of(pid, 300) for pid in pids]
    assert exit_codes == [0, 0], (tmp_path / "processes" / "rank-0.err").read_text()[-3000:]
    assert main(["train", "--config", str(config("one", 6))]) == 0

    alone, together = (read_safetensors(tmp_path / name / "lora" / "adapter_model.safetensors")
                       for name in ("one", "two"))
    assert alone.keys() == together.keys()
    assert max(alone[key].abs().max().item() for key in alone if "lora_B" in key) > 1e-3
    assert max((alone[key] - together[key]).abs().max().item() for key in alone) < 2e-5
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == ["lora"]


def test_a_timeout_that_is_not_positive_is_refused():
    from lora_trainer.config import load_config
    from lora_trainer.errors import UserError

    with pytest.raises(UserError, match="distributed_timeout_seconds"):
        load_config(None, {"distributed_timeout_seconds": 0}, [])


@pytest.mark.parametrize("message", ["Application timeout caused pair closure",
                                     "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error",
                                     "Connection closed by peer [127.0.0.1]:29500"])
def test_a_collective_error_from_the_backward_pass_reads_as_a_lost_process(message, monkeypatch):
    # DDP's all-reduce raises these as plain RuntimeErrors from inside loss.backward().
    from lora_trainer.errors import UserError
    from lora_trainer.train import distributed

    monkeypatch.setattr(distributed, "_launched_several", lambda: True)
    with pytest.raises(UserError, match="another training process died"):
        with distributed.reporting_lost_processes(5):
            raise RuntimeError(message)
    with pytest.raises(RuntimeError, match="a bug of our own"):
        with distributed.reporting_lost_processes(5):
            raise RuntimeError("a bug of our own")
