"""The Train LoRA tab's logic: the caption editor, defaults per model family, the form <-> config mapping,
presets, the status view and the Test panel's grid form. None of it needs gradio; the last test builds the tab
where gradio is installed."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from lora_trainer.config import TrainConfig, config_from_dict, load_config
from lora_trainer.errors import UserError
from lora_trainer.grid import GridPlan, parse_seeds, parse_strengths
from lora_trainer.jobs import JobStatus
from lora_trainer.tab.captioning import caption_options
from lora_trainer.tab.dataset import dataset_contents, prepare_default_folder, save_caption
from lora_trainer.tab.form import (
    HOST_OWNED_KEYS,
    MAIN_KEYS,
    SUBSET_COLUMNS,
    config_from_form,
    default_config,
    form_fields,
    form_values,
    gpu_mixed_precision,
)
from lora_trainer.tab.grids import (
    default_grid_prompt,
    grid_cell_captions,
    grid_plan_from_form,
    last_run_choices,
    lora_choices,
)
from lora_trainer.tab.presets import load_preset, preset_names, save_preset
from lora_trainer.tab.progress import (
    chart_json,
    chart_points,
    format_duration,
    queue_note,
    saved_html,
    status_html,
)
from lora_trainer.tab.training import advanced_groups


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)
    return path


def test_the_dataset_lists_images_in_training_order_with_their_captions_and_previews(tmp_path):
    dataset = tmp_path / "dataset"
    first, second, nested = _image(dataset / "a.png"), _image(dataset / "b.jpg"), _image(dataset / "10_x" / "c.png")
    (dataset / "a.txt").write_text("  a red square \n", encoding="utf-8")
    (dataset / "notes.txt").write_text("not a caption", encoding="utf-8")
    (dataset / "b.txt").write_bytes(b"\xff\xfe\xfa")

    contents = dataset_contents(dataset, tmp_path / "previews")

    assert contents.images == [(first.resolve(), "a red square"), (second.resolve(), None), (nested.resolve(), "")]
    assert [preview.parent for preview in contents.previews] == [tmp_path / "previews"] * 3
    assert contents.skipped == []


def test_files_the_trainer_would_skip_are_listed_with_its_reasons_and_not_counted(tmp_path):
    dataset = tmp_path / "dataset"
    _image(dataset / "good.png")
    (dataset / "empty.png").write_bytes(b"")
    (dataset / "text.png").write_text("I am not a picture", encoding="utf-8")
    Image.new("RGB", (64, 64), "blue").save(dataset / "whole.png")
    (dataset / "truncated.png").write_bytes((dataset / "whole.png").read_bytes()[:120])
    (dataset / "whole.png").unlink()

    contents = dataset_contents(dataset, tmp_path / "previews")

    assert [path.name for path, _ in contents.images] == ["good.png"]
    reasons = {path.name: reason for path, reason in contents.skipped}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["text.png"] == "not an image Pillow can read"
    assert reasons["truncated.png"].startswith("damaged or truncated image")
    shown = contents.summary_html(dataset)
    assert "1 images ready to train · 1 without a caption · 3 skipped" in shown
    assert "<code>empty.png</code>: empty file (0 bytes)" in shown and "lora-trainer-error" not in shown


def test_an_empty_dataset_folder_says_where_to_put_the_images(tmp_path):
    shown = dataset_contents(tmp_path, tmp_path / "previews").summary_html(tmp_path)
    assert f"No images in {tmp_path} yet: put the training images there" in shown
    assert "lora-trainer-error" not in shown


def test_the_hosts_missing_default_datasets_folder_is_created(tmp_path):
    prepare_default_folder(tmp_path / "webui" / "datasets")
    assert (tmp_path / "webui" / "datasets").is_dir()
    prepare_default_folder(None)  # a host without a default folder


@pytest.mark.parametrize("name", ["", "   ", "missing", "a.png"])
def test_the_dataset_panel_asks_for_an_existing_folder(tmp_path, name):
    _image(tmp_path / "a.png")
    with pytest.raises(UserError, match="[Dd]ataset folder"):
        dataset_contents(tmp_path / name if name.strip() else name, tmp_path / "previews")


def test_caption_options_come_from_the_tab_fields_with_blank_meaning_the_default():
    options = caption_options("coca", "overwrite", "sks", "  ", "", "greedy", 3.0, 1.3)
    assert (options.model, options.mode, options.prefix, options.arch, options.pretrained) == \
        ("coca", "overwrite", "sks", None, None)
    assert (options.decoding.strategy, options.decoding.max_tokens, options.decoding.repetition_penalty) == \
        ("greedy", 3, 1.3)
    assert options.decoding.min_tokens == 3  # a max length below the default minimum lowers the minimum
    assert caption_options("coca", "skip", "", "", "", "beam", 30, 1.0).decoding.min_tokens == 5
    with pytest.raises(UserError, match="Unknown decoding"):
        caption_options("coca", "skip", "", "", "", "nucleus", 30, 1.0)


def test_save_caption_writes_the_txt_beside_the_image(tmp_path):
    image = _image(tmp_path / "photo.png")
    (tmp_path / "photo.txt").write_text("old", encoding="utf-8")

    written = save_caption(tmp_path, image, "  sks, a new caption \n")

    assert written == tmp_path.resolve() / "photo.txt"
    assert written.read_text(encoding="utf-8") == "sks, a new caption"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photo.png", "photo.txt"]  # no temporary left


def test_save_caption_refuses_files_outside_the_dataset_or_not_images(tmp_path):
    dataset = tmp_path / "dataset"
    outside = _image(tmp_path / "elsewhere.png")
    _image(dataset / "a.png")
    text_file = dataset / "notes.md"
    text_file.write_text("x")
    for target in (outside, text_file, dataset / "missing.png", dataset / ".." / "elsewhere.png"):
        with pytest.raises(UserError, match="not an image of the dataset folder"):
            save_caption(dataset, target, "caption")
    assert not (tmp_path / "elsewhere.txt").exists() and not (dataset / "notes.txt").exists()


@pytest.mark.parametrize(("family", "resolution", "sample_cfg_scale"),
                         [("sd1", 512, 7.0), ("sd2", 768, 7.0), ("sdxl", 1024, 7.0), ("flux", 1024, 1.0),
                          (None, 512, 7.0)])
def test_defaults_follow_the_loaded_model_family(family, resolution, sample_cfg_scale):
    config = default_config(family, "bf16")
    assert (config.dataset.resolution, config.sampling.sample_cfg_scale) == (resolution, sample_cfg_scale)
    assert (config.network.lora_rank, config.network.lora_alpha, config.optimizer.unet_lr) == (16, 8.0, 1e-4)
    assert (config.training.epochs, config.training.batch_size) == (10, 1)
    assert (config.saving.save_every_n_epochs, config.saving.keep_last_n_saves) == (1, 5)
    assert config.dataset.cache_latents and config.training.mixed_precision == "bf16"
    assert config.logging.logging_dir is None  # a relative "logs" would land in the WebUI's working folder
    assert config.logging.log_every_n_steps == 1  # the loss chart starts at the first step


@pytest.mark.parametrize(("cuda", "bf16", "expected"), [(False, False, "no"), (True, False, "fp16"),
                                                         (True, True, "bf16")])
def test_mixed_precision_default_depends_on_the_gpu(monkeypatch, cuda, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert gpu_mixed_precision() == expected


def test_the_form_has_every_config_key_but_the_hosts_each_with_its_docstring():
    fields = form_fields()
    names = [field.name for field in fields]
    assert names == [name for name in TrainConfig().flat() if name not in HOST_OWNED_KEYS]
    assert all(field.info for field in fields), [field.name for field in fields if not field.info]
    kinds = {field.name: field.kind for field in fields}
    assert kinds["cache_latents"] == "check" and kinds["epochs"] == "int" and kinds["learning_rate"] == "number"
    assert kinds["optimizer_type"] == "choice" and kinds["lora_alpha"] == "optional"
    assert kinds["resume"] == "optional_path" and kinds["sample_prompts"] == "lines"
    assert kinds["target_modules"] == "list" and kinds["subsets"] == "table"
    optimizer = next(field for field in fields if field.name == "optimizer_type")
    assert optimizer.choices == ("adamw", "adamw8bit", "prodigy", "lion", "adafactor", "dadaptation",
                                 "adamw_schedulefree")
    assert kinds["optimizer_args"] == "mapping" and kinds["warmup_steps"] == "number"


def test_help_speaks_the_forms_words_not_the_configs():
    fields = {field.name: field for field in form_fields()}
    for field in fields.values():
        assert "`" not in field.info, field.name
        assert not any(f" {name} " in f" {field.info} " for name in fields if "_" in name), field.name
    assert "Max steps" in fields["epochs"].info
    assert "UNet learning rate" in fields["learning_rate"].info
    assert "(empty: no clipping)" in fields["max_grad_norm"].info
    assert fields["keep_last_n_saves"].info.endswith("the final file always stays. Empty keeps them all.")
    # The form starts Alpha at 8, not at the rank: its help must not promise otherwise.
    assert "Empty: equal to the Rank" in fields["lora_alpha"].info and "Default" not in fields["lora_alpha"].info


def test_the_advanced_settings_are_grouped_as_the_config_is():
    groups = advanced_groups()
    assert list(groups) == ["dataset", "model", "network", "optimizer", "training", "loss", "saving", "logging",
                            "sampling"]
    assert "bucket_step" in groups["dataset"] and "conv_rank" in groups["network"] and "seed" in groups["training"]
    assert "sample_steps" in groups["sampling"] and "min_snr_gamma" in groups["loss"]
    shown = [name for names in groups.values() for name in names]
    assert not set(shown) & {"train_data_dir", "output_name", "lora_rank", "epochs"}
    assert set(shown) | set(MAIN_KEYS) | {"train_data_dir"} == {field.name for field in form_fields()}


def test_form_values_give_back_the_same_config():
    config = config_from_dict(dict(train_data_dir=Path("/data/cats"), resolution=768, lora_alpha=4.0,
                                   learning_rate=1.2345678e-4, optimizer="prodigy", target_modules=["to_q", "to_v"],
                                   max_train_steps=None, v_parameterization=True, min_snr_gamma=5.0,
                                   sample_prompts=["a cat", "a cat, sks"], logging_dir=None, flip_aug=True,
                                   optimizer_args={"betas": [0.9, 0.99], "decouple": True}, warmup_steps=0.1))
    assert config_from_form(form_values(config)) == config


def test_the_subsets_table_holds_a_row_per_folder_and_empty_cells_take_the_datasets_values(tmp_path):
    config = config_from_dict(dict(train_data_dir=tmp_path, subsets=[
        {"image_dir": str(tmp_path / "cats"), "repeats": 3, "flip_aug": True},
        {"image_dir": str(tmp_path / "people"), "is_reg": True, "caption_extension": ".caption"}]))
    rows = form_values(config)["subsets"]
    assert rows[0][:3] == [str(tmp_path / "cats"), "3", ""] and rows[1][-1] == "True"
    assert config_from_form(form_values(config)) == config
    # gradio sends the table back as rows of strings, with the empty row a user left at the end.
    edited = config_from_form({"subsets": [[str(tmp_path / "dogs"), "2", "", "1", "true", "", "", "false"],
                                           ["", "", "", "", "", "", "", ""]]})
    dogs = edited.dataset.subsets[0]
    assert len(edited.dataset.subsets) == 1 and dogs.image_dir == tmp_path / "dogs"
    assert (dogs.repeats, dogs.keep_tokens, dogs.shuffle_caption, dogs.caption_extension) == (2, 1, True, None)
    with pytest.raises(UserError, match="repeats"):
        config_from_form({"subsets": [[str(tmp_path / "dogs"), "many", "", "", "", "", "", ""]]})


def test_a_config_without_subsets_shows_one_empty_row_so_the_table_keeps_its_column_names():
    config = config_from_dict(dict(train_data_dir=Path("/data/cats")))
    assert form_values(config)["subsets"] == [[""] * len(SUBSET_COLUMNS)]
    assert config_from_form(form_values(config)).dataset.subsets == []


def test_empty_optional_fields_mean_the_default_and_others_are_read_as_yaml():
    config = config_from_form({"lora_alpha": "", "unet_lr": "2e-4", "max_train_steps": " 300 ", "resume": "",
                               "v_parameterization": "false"})
    assert config.network.lora_alpha is None and config.optimizer.unet_lr == 2e-4
    assert config.training.max_train_steps == 300
    assert config.saving.resume is None and config.model.v_parameterization is False


def test_sample_prompts_are_one_per_line_and_module_lists_comma_separated():
    config = config_from_form({"sample_prompts": "sks, a cat\n\n  sks, a dog  \n", "target_modules": "to_q, to_k,"})
    assert config.sampling.sample_prompts == ["sks, a cat", "sks, a dog"]
    assert config.network.target_modules == ["to_q", "to_k"]


@pytest.mark.parametrize(("values", "message"), [
    ({"output_name": "../escape"}, "plain file name"),
    ({"lora_alpha": "[1, 2"}, "Alpha: .* is not a value"),
    ({"epochs": 0}, "'epochs' must be at least 1"),
    ({"learning_rate": "fast"}, "'learning_rate' should be a number"),
])
def test_invalid_form_values_are_user_errors(values, message):
    with pytest.raises(UserError, match=message):
        config_from_form(values)


def test_a_preset_is_the_yaml_the_cli_reads(tmp_path):
    config = config_from_dict(dict(train_data_dir=Path("/data/cats"), lora_rank=8, sample_prompts=["sks"],
                                   logging_dir=None))
    path = save_preset(tmp_path / "presets", "cats v2", config)
    assert path == tmp_path / "presets" / "cats v2.yaml"
    assert load_config(path) == config
    assert load_preset(tmp_path / "presets", "cats v2") == config
    assert preset_names(tmp_path / "presets") == ["cats v2"]


def test_an_existing_preset_is_replaced_only_when_asked(tmp_path):
    save_preset(tmp_path, "style", config_from_dict(dict(lora_rank=8)))
    with pytest.raises(UserError, match="exists.*Overwrite"):
        save_preset(tmp_path, "style", config_from_dict(dict(lora_rank=32)))
    assert load_preset(tmp_path, "style").network.lora_rank == 8
    save_preset(tmp_path, "style", config_from_dict(dict(lora_rank=32)), overwrite=True)
    assert load_preset(tmp_path, "style").network.lora_rank == 32


@pytest.mark.parametrize("name", ["", "  ", "../up", "a/b", "a\\b", ".hidden", "dot.", "x" * 65])
def test_preset_names_are_plain_names(tmp_path, name):
    with pytest.raises(UserError, match="Preset name"):
        save_preset(tmp_path, name, TrainConfig())
    assert list(tmp_path.iterdir()) == []


def test_preset_names_are_sorted_and_a_missing_folder_has_none(tmp_path):
    for name in ("b", "a", "C"):
        save_preset(tmp_path, name, TrainConfig())
    (tmp_path / "notes.txt").write_text("x")
    assert preset_names(tmp_path) == ["C", "a", "b"]
    assert preset_names(tmp_path / "missing") == []


def test_loading_a_missing_preset_says_so(tmp_path):
    with pytest.raises(UserError, match="no preset named 'gone'"):
        load_preset(tmp_path, "gone")


def test_chart_points_average_long_runs_down_to_the_limit():
    losses = [(step, float(step)) for step in range(1, 1001)]
    points = chart_points(losses, limit=100)
    assert len(points) == 100
    assert points[0] == (10, 5.5) and points[-1] == (1000, 995.5)
    assert chart_points(losses[:50], limit=100) == losses[:50]


def test_chart_json_carries_losses_saved_names_state_and_whether_to_refresh_the_lora_cards():
    status = JobStatus(kind="training", state="running", losses=[(1, 0.5), (2, 0.25)], saved=[Path("/l/x.safetensors")])
    assert json.loads(chart_json(status, True)) == {"losses": [[1, 0.5], [2, 0.25]], "validation": [],
                                                   "best_step": None, "saved": ["x.safetensors"],
                                                   "state": "running", "refresh_lora_cards": True,
                                                   "queue_note": queue_note(status)}
    assert json.loads(chart_json(status, False))["refresh_lora_cards"] is False


def test_a_generation_queued_behind_a_job_is_told_what_it_waits_for():
    training = JobStatus(kind="training", state="running", step=120, total_steps=400, seconds_left=190)
    assert queue_note(training) == "waiting for LoRA training (step 120/400, ETA 3:10)"
    saving = dataclasses.replace(training, activity="saving x.safetensors")
    assert queue_note(saving) == "waiting for LoRA training (step 120/400)"
    grid = JobStatus(kind="grid", state="running", step=2, total_steps=6)
    assert queue_note(grid) == "waiting for LoRA test grid (2/6)"
    assert queue_note(JobStatus(kind="captioning", state="running")) == "waiting for LoRA trainer captioning"
    assert queue_note(dataclasses.replace(training, state="finished")) == ""


def _validated_run(folder: Path) -> JobStatus:
    """A run that measured its validation loss at steps 0, 10 and 20 and saved after steps 10 and 20."""
    early, late = folder / "v-s000010.safetensors", folder / "v-s000020.safetensors"
    return JobStatus(kind="training", state="finished", step=20, total_steps=20, losses=[(10, 0.3), (20, 0.2)],
                     validation_losses=[(0, 0.5), (10, 0.25), (20, 0.4)], saved=[early, late],
                     saved_validation_losses={early: 0.25, late: 0.4})


def test_the_chart_gets_the_validation_loss_and_its_best_step(tmp_path):
    data = json.loads(chart_json(_validated_run(tmp_path), False))
    assert data["validation"] == [[0, 0.5], [10, 0.25], [20, 0.4]] and data["best_step"] == 10


def test_the_file_with_the_lowest_validation_loss_is_marked_and_named_in_the_status(tmp_path):
    status = _validated_run(tmp_path)
    assert status.best_saved == tmp_path / "v-s000010.safetensors"
    saved = saved_html(status, True)
    assert saved.index("lowest validation loss (0.2500)") < saved.index("v-s000020")
    assert "validation loss 0.4000 (lowest 0.2500 at step 10)" in status_html(status)


def test_the_test_panel_preselects_the_file_with_the_lowest_validation_loss(tmp_path):
    pytest.importorskip("gradio")
    from lora_trainer.host import RenderDefaults
    from lora_trainer.tab.grids import GridPanel

    class _Host(_LoraFolder):
        def render_defaults(self) -> RenderDefaults:
            return RenderDefaults(width=512, height=512)

    class _Runner:
        def status(self) -> JobStatus:
            return status

    class _Queue:
        runner = _Runner()

    status = _validated_run(tmp_path)
    for path in status.saved:
        _lora_file(path, 100)
    components = [name for name in GridPanel.__dataclass_fields__ if name not in ("queue", "host")]
    files = GridPanel(_Queue(), _Host(tmp_path), *components).defaults("sks", "")["files"]
    assert files["value"] == ["v-s000010.safetensors"]


def test_status_of_a_running_training_shows_progress_speed_eta_and_memory():
    status = JobStatus(kind="training", state="running", step=30, total_steps=120, epoch=2, losses=[(30, 0.12345)],
                       steps_per_second=1.25, samples_per_second=5.0, seconds_left=3725, memory="1.20 GiB peak VRAM",
                       message="Saved x.safetensors")
    shown = status_html(status)
    assert 'style="width: 25.0%"' in shown
    for part in ("Training: running", "Step 30/120", "epoch 2", "loss 0.1235", "1.25 it/s, 5.0 samples/s",
                 "ETA 1:02:05", "1.20 GiB peak VRAM", "Saved x.safetensors"):
        assert part in shown


def test_a_failed_job_shows_its_message_as_an_error_escaped():
    shown = status_html(JobStatus(kind="training", state="failed", message="folder <x> does not exist"))
    assert 'class="lora-trainer-message lora-trainer-error"' in shown
    assert "folder &lt;x&gt; does not exist" in shown


def test_a_failed_job_shows_no_progress_that_did_not_happen():
    shown = status_html(JobStatus(kind="captioning", state="failed", step=9, total_steps=12,
                                  message="OSError: weights"))
    assert "Captioning: failed" in shown and "9/12" not in shown and "lora-trainer-bar" not in shown


def test_a_message_of_several_lines_keeps_them_apart():
    shown = status_html(JobStatus(kind="training", state="running", message="4 images\nlatents cached once"))
    assert "4 images<br>latents cached once" in shown


def test_stop_says_whether_the_weights_so_far_are_saved():
    from lora_trainer.tab.training import stop_notice

    assert stop_notice(JobStatus(kind="training", state="running", step=0)).endswith("nothing will be saved.")
    assert stop_notice(JobStatus(kind="training", state="running", step=3)) == \
        "Stopping: the weights so far are saved first."
    assert stop_notice(JobStatus(kind="captioning", state="running", step=0)) == "Stopping the captioning."


def test_a_job_asked_to_stop_shows_it_in_its_status():
    shown = status_html(JobStatus(kind="captioning", state="running", step=3, total_steps=8, activity="stopping"))
    assert "Captioning: running · stopping" in shown


def test_while_saving_the_status_says_so_and_shows_no_eta():
    status = JobStatus(kind="training", state="running", step=30, total_steps=120, steps_per_second=1.0,
                       seconds_left=90, activity="saving x-s000030.safetensors")
    shown = status_html(status)
    assert "Training: running · saving x-s000030.safetensors" in shown and "ETA" not in shown
    assert "ETA 1:30" in status_html(dataclasses.replace(status, activity=""))


def test_captioning_progress_counts_images():
    shown = status_html(JobStatus(kind="captioning", state="running", step=3, total_steps=8))
    assert "Captioning: running" in shown and "3/8" in shown and "ETA" not in shown


def test_idle_status_and_durations():
    assert "No job has run since the WebUI started" in status_html(JobStatus())
    assert [format_duration(s) for s in (0, 59.6, 61, 3600, 36061)] == ["0:00", "1:00", "1:01", "1:00:00", "10:01:01"]


def test_saved_files_are_listed_by_name_escaped():
    assert "No file saved yet" in saved_html(JobStatus(), True)
    shown = saved_html(JobStatus(saved=[Path("/loras/<b>.safetensors")]), True)
    assert "&lt;b&gt;.safetensors" in shown and "<b>" not in shown
    assert "Refresh" not in shown


def test_when_the_page_cannot_refresh_the_lora_cards_the_saved_list_says_how_to_see_them():
    shown = saved_html(JobStatus(saved=[Path("/loras/x.safetensors")]), False)
    assert "work in prompts now" in shown and "Refresh" in shown and "--ckpt" in shown


def test_strengths_are_numbers_separated_by_commas_or_spaces():
    assert parse_strengths("0, 0.25 ,0.5  1,") == [0.0, 0.25, 0.5, 1.0]
    assert parse_strengths("-0.5") == [-0.5]


@pytest.mark.parametrize(("text", "message"), [("", "at least one strength"), (" , ", "at least one strength"),
                                               ("0, strong", "'strong' is not a number"),
                                               ("nan", "'nan' is not a number"), ("1, inf", "'inf' is not a number")])
def test_strengths_that_are_not_numbers_are_user_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_strengths(text)


def test_seeds_are_whole_numbers_and_minus_one_draws_one_random_seed(monkeypatch):
    assert parse_seeds("1, 2 3") == [1, 2, 3]
    assert parse_seeds("4294967295") == [4294967295]
    monkeypatch.setattr(random, "randint", lambda low, high: (low + high) // 2)
    assert parse_seeds("-1") == [2147483647]


@pytest.mark.parametrize(("text", "message"), [("", "at least one seed"), ("1.5", "'1.5' is not a whole number"),
                                               ("-2", "out of range"), ("4294967296", "out of range")])
def test_seeds_outside_the_webuis_range_are_user_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_seeds(text)


def test_the_default_grid_prompt_is_the_trigger_word_and_the_first_caption(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _image(tmp_path / name)
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe")  # unreadable: skipped
    (tmp_path / "c.txt").write_text("a blue bike", encoding="utf-8")  # a.png has none: the first caption is c's

    assert default_grid_prompt(" sks ", tmp_path) == "sks, a blue bike"
    assert default_grid_prompt("", tmp_path) == "a blue bike"
    assert default_grid_prompt("bike", tmp_path) == "a blue bike"  # the caption holds the trigger word already
    assert default_grid_prompt("bik", tmp_path) == "bik, a blue bike"


@pytest.mark.parametrize("folder", ["", None, "missing", "empty"])
def test_without_a_caption_the_default_grid_prompt_is_the_trigger_word(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    _image(tmp_path / "empty" / "uncaptioned.png")
    assert default_grid_prompt("sks", tmp_path / folder if folder else folder) == "sks"


class _LoraFolder:
    """The one part of `Host` the grid form reads."""

    def __init__(self, folder: Path):
        self.folder = folder

    def lora_dir(self) -> Path:
        return self.folder


def _lora_file(path: Path, mtime: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    os.utime(path, (mtime, mtime))
    return path


def test_the_file_picker_names_lora_files_by_their_path_in_the_lora_folder_newest_first(tmp_path):
    host = _LoraFolder(tmp_path)
    old = _lora_file(tmp_path / "style-000001.safetensors", 100)
    new = _lora_file(tmp_path / "sub" / "x.safetensors", 200)
    (tmp_path / "style-000001.json").write_text("{}")

    assert lora_choices(host) == ["sub/x.safetensors", "style-000001.safetensors"]
    # The last run's files in saving order, leaving out one deleted since.
    assert last_run_choices(host, [old, tmp_path / "gone.safetensors", new]) == ["style-000001.safetensors",
                                                                                  "sub/x.safetensors"]


def test_the_grid_form_makes_a_plan_of_the_picked_files_in_the_picked_order(tmp_path):
    host = _LoraFolder(tmp_path)
    first, second = _lora_file(tmp_path / "e1.safetensors", 1), _lora_file(tmp_path / "e2.safetensors", 2)

    plan = grid_plan_from_form(host, " sks, a cat ", " blurry ", ["e2.safetensors", "e1.safetensors"], "0, 1", "7",
                               " DDIM ", 4, 1.5, 64.0, 32)

    assert plan == GridPlan(prompt="sks, a cat", loras=[second.resolve(), first.resolve()], strengths=[0.0, 1.0],
                            seeds=[7], negative_prompt="blurry", steps=4, cfg_scale=1.5, width=64, height=32,
                            sampler_name="DDIM")


@pytest.mark.parametrize(("changes", "message"), [
    ({"prompt": "  "}, "Enter a prompt"),
    ({"files": []}, "Pick at least one LoRA file"),
    ({"files": ["gone.safetensors"]}, "no LoRA file 'gone.safetensors'.*refresh"),
    ({"files": ["../outside.safetensors"]}, "no LoRA file '../outside.safetensors'"),
    ({"strengths": "half"}, "'half' is not a number"),
    ({"seeds": "1, 2"}, "either LoRA files or seeds"),
    ({"steps": 0}, "Steps must be a whole number of at least 1"),
    ({"steps": None}, "Steps must be a whole number"),
    ({"cfg_scale": "x"}, "CFG scale 'x' is not usable"),
    ({"width": 500}, "Width must be a multiple of 8"),
    ({"height": 4}, "Height must be a whole number of at least 8"),
])
def test_grid_form_mistakes_are_user_errors(tmp_path, changes, message):
    lora_dir = tmp_path / "Lora"
    for name in ("e1", "e2"):
        _lora_file(lora_dir / f"{name}.safetensors", 1)
    _lora_file(tmp_path / "outside.safetensors", 1)
    values = dict(prompt="sks", negative_prompt="", files=["e1.safetensors", "e2.safetensors"], strengths="0, 1",
                  seeds="1", sampler_name="", steps=4, cfg_scale=7, width=64, height=64)
    values.update(changes)
    with pytest.raises(UserError, match=message):
        grid_plan_from_form(_LoraFolder(lora_dir), **values)


def test_grid_cells_are_captioned_with_their_row_and_strength():
    by_file = GridPlan("sks", [Path("a.safetensors"), Path("b.safetensors")], strengths=[0.0, 0.5])
    assert grid_cell_captions(by_file) == ["a, strength 0", "a, strength 0.5", "b, strength 0", "b, strength 0.5"]
    by_seed = GridPlan("sks", [Path("a.safetensors")], strengths=[1.0], seeds=[3, 4])
    assert grid_cell_captions(by_seed) == ["a, seed 3, strength 1", "a, seed 4, strength 1"]


def test_the_tab_builds_on_the_installed_gradio(tmp_path):
    gr = pytest.importorskip("gradio")
    pytest.importorskip("ldm")
    from fake_host import FakeHost
    from ldm_models import tiny_sd1

    from lora_trainer.tab import build_tab

    tab = build_tab(FakeHost(tiny_sd1(tmp_path / "model"), tmp_path / "Lora"))
    assert isinstance(tab, gr.Blocks)
    elem_ids = {getattr(block, "elem_id", None) for block in tab.blocks.values()}
    assert {"lora_trainer_tab", "lora_trainer_poll", "lora_trainer_chart_data", "lora_trainer_start",
            "lora_trainer_stop", "lora_trainer_save_now", "lora_trainer_caption_button", "lora_trainer_test",
            "lora_trainer_grid_files", "lora_trainer_grid_button", "lora_trainer_grid_image",
            "lora_trainer_grid_cells"} <= elem_ids


def test_the_grid_defaults_to_the_last_runs_resolution_not_txt2img_size(tmp_path):
    pytest.importorskip("gradio")
    from lora_trainer.host import RenderDefaults
    from lora_trainer.tab.grids import GridPanel

    class _Host(_LoraFolder):
        def render_defaults(self) -> RenderDefaults:
            return RenderDefaults(width=512, height=512)

    class _Runner:
        def __init__(self, status: JobStatus):
            self.current = status

        def status(self) -> JobStatus:
            return self.current

    runner = _Runner(JobStatus(kind="training", state="finished", config=config_from_dict(dict(resolution=768))))
    components = [name for name in GridPanel.__dataclass_fields__ if name not in ("queue", "host")]
    panel = GridPanel(SimpleNamespace(runner=runner), _Host(tmp_path), *components)
    defaults = panel.defaults("sks", "")
    assert (defaults["width"], defaults["height"]) == (768, 768)
    runner.current = JobStatus()
    assert (panel.defaults("sks", "")["width"], panel.defaults("sks", "")["height"]) == (512, 512)
