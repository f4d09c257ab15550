from pathlib import Path

import pytest

from lora_trainer.config import config_from_dict, load_config, parse_overrides, save_config
from lora_trainer.errors import UserError


def test_unknown_key_is_named_with_a_suggestion_and_the_valid_keys():
    with pytest.raises(UserError) as error:
        config_from_dict({"lora_rnak": 8})
    message = str(error.value)
    assert "'lora_rnak'" in message and "did you mean 'lora_rank'" in message and "train_data_dir" in message


def test_wrong_type_names_the_key_and_what_it_should_be():
    with pytest.raises(UserError, match="'batch_size' should be a whole number, got 'four'"):
        config_from_dict({"batch_size": "four"})


def test_invalid_choice_lists_the_valid_choices():
    with pytest.raises(UserError) as error:
        config_from_dict({"optimizer": "sgd"})
    assert "'adamw'" in str(error.value) and "'prodigy'" in str(error.value)


def test_learning_rate_written_as_yaml_string_is_a_number(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("learning_rate: 1e-4\nlora_rank: 4\n")
    assert load_config(path).optimizer.learning_rate == pytest.approx(1e-4)


def test_command_line_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("lora_rank: 4\nunet_lr: 0.001\n")
    config = load_config(path, parse_overrides(["--lora_rank", "8", "--target-modules=to_q,to_v"]))
    assert config.network.lora_rank == 8
    assert config.optimizer.unet_lr == pytest.approx(0.001)
    assert config.network.target_modules == ["to_q", "to_v"]


def test_override_without_value_is_an_error():
    with pytest.raises(UserError, match="--lora_rank needs a value"):
        parse_overrides(["--lora_rank"])


def test_saved_config_loads_back_equal(tmp_path):
    config = config_from_dict({"train_data_dir": Path("data"), "lora_rank": 8, "min_snr_gamma": 5.0,
                               "sample_prompts": ["a cat"]})
    save_config(config, tmp_path / "preset.yaml")
    assert load_config(tmp_path / "preset.yaml") == config


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ""])
def test_output_name_with_path_tricks_is_refused(name):
    with pytest.raises(UserError, match="plain file name"):
        config_from_dict(dict(output_name=name))


def test_text_encoder_cache_with_text_encoder_training_is_refused():
    with pytest.raises(UserError, match="cache_text_encoder_outputs"):
        config_from_dict(dict(cache_text_encoder_outputs=True, train_text_encoder=True))


def test_resolution_must_fit_the_bucket_step():
    with pytest.raises(UserError, match="multiple of bucket_step"):
        config_from_dict(dict(resolution=500))


def test_non_mapping_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(path)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_one_sample_prompt_on_the_command_line_stays_one_prompt_commas_and_all():
    config = load_config(None, parse_overrides(["--sample_prompts", "sks, a cat", "--target_modules", "to_q,to_k"]))
    assert config.sampling.sample_prompts == ["sks, a cat"]
    assert config.network.target_modules == ["to_q", "to_k"]


def test_a_yaml_list_of_sample_prompts_is_several_prompts(tmp_path):
    config_file = tmp_path / "my.yaml"
    config_file.write_text("sample_prompts:\n  - sks, a cat\n  - sks, a dog\n", encoding="utf-8")
    assert load_config(config_file).sampling.sample_prompts == ["sks, a cat", "sks, a dog"]


def test_a_config_saved_as_utf16_by_notepad_is_read(tmp_path):
    config_file = tmp_path / "my.yaml"
    config_file.write_text("output_name: café\nlora_rank: 8\n", encoding="utf-16")
    assert load_config(config_file).saving.output_name == "café"


def test_a_config_in_a_legacy_encoding_says_to_save_it_as_utf8(tmp_path):
    config_file = tmp_path / "my.yaml"
    config_file.write_text("output_name: café\n", encoding="cp1252")
    with pytest.raises(UserError, match="not UTF-8 text .*save it with the encoding UTF-8"):
        load_config(config_file)


@pytest.mark.parametrize("name", ["my:lora", "x>y", "<z"])
def test_an_output_name_a_prompt_tag_cannot_hold_is_refused_with_the_reason(name):
    with pytest.raises(UserError, match="a <lora:name:weight> prompt tag could not name the LoRA"):
        config_from_dict(dict(output_name=name))


def test_a_grouped_config_and_a_flat_one_are_the_same_config(tmp_path):
    grouped, flat = tmp_path / "grouped.yaml", tmp_path / "flat.yaml"
    grouped.write_text("network:\n  lora_rank: 8\n  train_text_encoder: true\noptimizer:\n  optimizer_type: lion\n"
                       "  unet_lr: 2.0e-4\ntraining:\n  batch_size: 2\n")
    flat.write_text("lora_rank: 8\ntrain_text_encoder: true\noptimizer: lion\nunet_lr: 2.0e-4\nbatch_size: 2\n")
    config = load_config(grouped)
    assert config == load_config(flat)
    assert (config.network.lora_rank, config.optimizer.optimizer_type, config.training.batch_size) == (8, "lion", 2)


def test_a_saved_config_is_written_in_groups(tmp_path):
    save_config(config_from_dict({"lora_rank": 8}), tmp_path / "saved.yaml")
    text = (tmp_path / "saved.yaml").read_text()
    assert text.startswith("dataset:\n") and "\nnetwork:\n  network_type: lora\n  lora_rank: 8\n" in text


def test_an_override_may_name_the_group_or_not(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("network:\n  lora_rank: 8\n")
    assert load_config(path, parse_overrides(["--network.lora_rank", "4"])).network.lora_rank == 4
    assert load_config(path, parse_overrides(["--lora_rank", "2"])).network.lora_rank == 2


def test_a_key_given_twice_or_in_the_wrong_group_says_where_it_belongs():
    with pytest.raises(UserError, match="'lora_rank' is given twice"):
        config_from_dict({"lora_rank": 4, "network": {"lora_rank": 8}})
    with pytest.raises(UserError, match="'resolution' belongs in section 'dataset', not 'network'"):
        config_from_dict({"network": {"resolution": 256}})
    with pytest.raises(UserError, match="unknown config section 'netwrk'"):
        config_from_dict({"netwrk.lora_rank": 4})
