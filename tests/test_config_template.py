"""The commented config template (`init-config`, `train --print-config`) and kohya's spellings of keys."""

from __future__ import annotations

import dataclasses

from lora_trainer.cli import main
from lora_trainer.config import GROUPS, TrainConfig, config_from_dict, load_config
from lora_trainer.config_template import config_template


def test_init_config_writes_every_key_with_its_default_and_reads_back_as_the_defaults(tmp_path, capsys):
    path = tmp_path / "my.yaml"
    assert main(["init-config", str(path)]) == 0
    assert str(path) in capsys.readouterr().out
    assert load_config(path) == TrainConfig()


def test_every_key_in_the_template_follows_its_help_under_its_group(tmp_path):
    path = tmp_path / "my.yaml"
    main(["init-config", str(path)])
    lines = path.read_text(encoding="utf-8").splitlines()
    for group, group_type in GROUPS.items():
        assert any(line.startswith(f"{group}:  # ") for line in lines)
        for field in dataclasses.fields(group_type):
            index = next(i for i, line in enumerate(lines) if line.startswith(f"  {field.name}: "))
            assert lines[index - 1].startswith("  # "), field.name


def test_a_named_layer_set_is_written_by_its_name_and_a_custom_list_as_it_is(tmp_path, capsys):
    assert main(["train", "--print-config", "--target_modules", "attention"]) == 0
    printed = capsys.readouterr().out
    assert "  target_modules: attention\n" in printed and "  text_encoder_target_modules: kohya\n" in printed
    custom = {"target_modules": ["to_q", "to_v"], "text_encoder_target_modules": ["q_proj", "k_proj", "v_proj"]}
    path = tmp_path / "custom.yaml"
    path.write_text(config_template(config_from_dict(custom)), encoding="utf-8")
    assert "  target_modules: [to_q, to_v]\n" in path.read_text(encoding="utf-8")
    assert load_config(path) == config_from_dict(custom)


def test_init_config_never_overwrites_a_file(tmp_path, capsys):
    path = tmp_path / "my.yaml"
    path.write_text("mine", encoding="utf-8")
    assert main(["init-config", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert path.read_text(encoding="utf-8") == "mine"


def test_print_config_shows_the_config_as_it_would_run(tmp_path, capsys):
    assert main(["train", "--print-config", "--lora_rank", "8", "--sample_prompts", "sks, a cat"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out, encoding="utf-8")
    assert load_config(printed) == config_from_dict({"lora_rank": 8, "sample_prompts": ["sks, a cat"]})


def test_kohya_spellings_are_read_as_our_keys_with_a_note(tmp_path):
    path = tmp_path / "kohya.yaml"
    path.write_text("network_dim: 8\nnetwork_alpha: 4\ntrain_batch_size: 2\nlr_scheduler: cosine\n"
                    "max_train_epochs: 3\n", encoding="utf-8")
    notes: list[str] = []
    config = load_config(path, notes=notes)
    assert (config.network.lora_rank, config.network.lora_alpha, config.training.batch_size) == (8, 4.0, 2)
    assert (config.optimizer.scheduler, config.training.epochs) == ("cosine", 3)
    assert "'network_dim' is kohya's name for 'lora_rank' (in section 'network')" in notes[0]
    assert len(notes) == 5


def test_the_command_line_prints_the_note_for_a_kohya_spelling(capsys):
    assert main(["train", "--print-config", "--network_dim", "8"]) == 0
    assert "note: 'network_dim' is kohya's name for 'lora_rank'" in capsys.readouterr().err
