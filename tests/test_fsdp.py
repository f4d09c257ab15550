"""Fully sharded training (FSDP2) of the language-model trainer: two CPU processes (gloo) that accelerate's
environment tells to shard (ACCELERATE_USE_FSDP, as `accelerate launch --use_fsdp` sets it) train the tiny Llama
together, each holding half of it (see launched.py for how they start)."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import torch
from launched import exit_code_of, read_safetensors, signal_the_second, start_processes

from lora_trainer.cli import main
from lora_trainer.errors import UserError
from lora_trainer.train.state import STATE_FILE

pytest.importorskip("peft")


@pytest.fixture
def sharding(monkeypatch):
    """accelerate's environment for a launch with --use_fsdp (the forked processes inherit it)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")


def _llm_config(folder: Path, name: str, **keys) -> Path:
    """A run of the tiny Llama on the colour task, answers of one to three words (the sequences' trained tokens
    differ), saving at step 2 with its state, a validation loss and a sample; `keys` add to or replace that."""
    from llm_models import COLOUR_TASK, save_tiny_llama, write_jsonl

    base, data = folder / "base", folder / "colours.jsonl"
    if not base.exists():
        save_tiny_llama(base)
        write_jsonl(data, [dict(record, output=" ".join([record["output"]] * (1 + index % 3)))
                           for index, record in enumerate(COLOUR_TASK.training_records())])
    settings = dict(task="llm", base_model=base, train_data=data, output_dir=folder / name, logging_dir="null",
                    lora_dropout=0.0, learning_rate=1.0e-2, gradient_accumulation_steps=2, max_train_steps=3,
                    save_every_n_steps=2, save_state="true", validation_split=0.2,
                    sample_prompts='["What colour is the zorp ?"]', sample_max_new_tokens=3)
    settings.update(keys)
    path = folder / f"{name}.yaml"
    path.write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The folder of a run of one process with a global batch of 6 (its files in `one/`)."""
    folder = tmp_path_factory.mktemp("one-process")
    assert main(["train", "--config", str(_llm_config(folder, "one", batch_size=6))]) == 0
    return folder


def _train_two(config: Path, output: Path) -> str:
    """Train `config` in two sharded processes; the main one's output."""
    pids = start_processes(config, 2, output)
    exit_codes = [exit_code_of(pid, 300) for pid in pids]
    assert exit_codes == [0, 0], "\n".join((output / f"rank-{rank}.err").read_text()[-3000:] for rank in range(2))
    assert (output / "rank-1.out").read_text() == ""
    return (output / "rank-0.out").read_text()


def _largest_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max((first[key] - second[key]).abs().max().item() for key in first)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(folder / "adapter_model.safetensors")


def test_two_sharded_processes_train_the_same_adapter_as_one_each_holding_half_the_model(one_process, tmp_path,
                                                                                          sharding):
    output = _train_two(_llm_config(one_process, "two", batch_size=3), tmp_path / "processes")

    alone, together = _adapter(one_process / "one" / "lora"), _adapter(one_process / "two" / "lora")
    # LoRA's B matrices start at zero: runs that learned nothing would match trivially.
    assert max(alone[key].abs().max().item() for key in alone if "lora_B" in key) > 1e-3
    assert _largest_difference(alone, together) < 2e-5
    # The training state saved at step 2 holds the whole optimizer state, gathered from the shards.
    states = [torch.load(one_process / name / "lora-s000002" / STATE_FILE, weights_only=False)
              for name in ("one", "two")]
    moments = [{f"{index}.{name}": value for index, state in each["optimizer"]["state"].items()
                for name, value in state.items()} for each in states]
    assert _largest_difference(*moments) < 2e-5

    # Written once, by the main process, which also reported the validation loss and the samples.
    assert sorted(path.name for path in (one_process / "two").iterdir()) == ["lora", "lora-s000002"]
    assert "validation loss" in output and "sample at step 3: 'What colour is the zorp ?' ->" in output
    held = re.search(r"FSDP: the 2 processes hold ([\d,]+), ([\d,]+) of the model's ([\d,]+) parameter bytes", output)
    first, second, whole = (int(number.replace(",", "")) for number in held.groups())
    assert 0.45 * whole < first < 0.55 * whole and 0.45 * whole < second < 0.55 * whole


def test_sharded_processes_resume_a_state_that_one_process_saved(one_process, tmp_path, sharding):
    resumed = _llm_config(one_process, "resumed", batch_size=3, resume=one_process / "one" / "lora-s000002")
    output = _train_two(resumed, tmp_path / "processes")

    assert "Resuming at step 2" in output
    alone, resumed = _adapter(one_process / "one" / "lora"), _adapter(one_process / "resumed" / "lora")
    assert _largest_difference(alone, resumed) < 2e-5


def test_when_a_sharded_process_dies_the_other_stops_with_a_clear_message(tmp_path, sharding):
    config = _llm_config(tmp_path, "out", batch_size=1, max_train_steps=100000, save_every_n_steps="null",
                         distributed_timeout_seconds=5)
    exit_code, _ = signal_the_second(config, tmp_path / "processes", signal.SIGKILL, 65)
    errors = (tmp_path / "processes" / "rank-0.err").read_text()
    assert exit_code == 2, errors[-3000:]
    assert "another training process died, or did not answer within distributed_timeout_seconds (5 s)" in errors
    assert "Traceback" not in errors
    assert not (tmp_path / "out").exists()


def test_a_ctrl_c_that_reaches_one_sharded_process_stops_both_and_the_main_one_saves_the_whole_adapter(tmp_path,
                                                                                                     sharding):
    config = _llm_config(tmp_path, "out", batch_size=1, max_train_steps=100000, save_every_n_steps="null")
    exit_codes = signal_the_second(config, tmp_path / "processes", signal.SIGINT, 60)
    assert exit_codes == [130, 130], (tmp_path / "processes" / "rank-0.err").read_text()[-3000:]
    [saved] = (tmp_path / "out").iterdir()
    assert saved.name.startswith("lora-interrupted-s") and (saved / STATE_FILE).is_file()
    weights = read_safetensors(saved / "adapter_model.safetensors")
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)


def test_qlora_and_merging_are_refused_under_fsdp():
    from lora_trainer.llm.config import llm_config_from_dict
    from lora_trainer.llm.loop import check_shardable

    for keys, refused in (({"load_in_4bit": True}, "load_in_4bit"), ({"merge": True}, "merge")):
        with pytest.raises(UserError, match=f"{refused}.* does not combine with FSDP"):
            check_shardable(llm_config_from_dict({"task": "llm", **keys}, {}))


def test_the_image_trainer_refuses_fsdp_and_names_data_parallel_launch(tmp_path, sharding):
    from lora_trainer.config import load_config
    from lora_trainer.train.loop import train

    config = load_config(None, {"train_data_dir": str(tmp_path), "base_model": str(tmp_path)}, [])
    with pytest.raises(UserError, match="accelerate launch --multi_gpu"):
        train(config, backend=None)


def test_deepspeed_is_refused_with_the_launches_that_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert main(["train", "--config", str(_llm_config(tmp_path, "out", batch_size=2))]) == 2
    assert re.search("DeepSpeed .* is not supported: launch with --multi_gpu .* --use_fsdp", capsys.readouterr().err)
