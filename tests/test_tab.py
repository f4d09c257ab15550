"""The Train LoRA tab's logic: the caption editor, defaults per model family, the form <-> config mapping,
presets and the status view. None of it needs gradio; the last test builds the tab where gradio is installed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_trainer.config import TrainConfig, load_config
from lora_trainer.errors import UserError
from lora_trainer.jobs import JobStatus
from lora_trainer.tab import (
    HOST_OWNED_KEYS,
    chart_json,
    chart_points,
    config_from_form,
    dataset_images,
    default_config,
    form_fields,
    form_values,
    format_duration,
    gpu_mixed_precision,
    load_preset,
    preset_names,
    save_caption,
    save_preset,
    saved_html,
    status_html,
)


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)
    return path


def test_dataset_images_lists_images_in_training_order_with_their_captions(tmp_path):
    first, second, nested = _image(tmp_path / "a.png"), _image(tmp_path / "b.jpg"), _image(tmp_path / "10_x" / "c.png")
    (tmp_path / "a.txt").write_text("  a red square \n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a caption", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\xfa")

    assert dataset_images(tmp_path) == [(first.resolve(), "a red square"), (second.resolve(), None),
                                        (nested.resolve(), "")]


@pytest.mark.parametrize("name", ["", "   ", "missing", "a.png"])
def test_dataset_images_asks_for_an_existing_folder(tmp_path, name):
    _image(tmp_path / "a.png")
    with pytest.raises(UserError, match="[Dd]ataset folder"):
        dataset_images(tmp_path / name if name.strip() else name)


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


@pytest.mark.parametrize(("family", "resolution"), [("sd1", 512), ("sd2", 768), ("sdxl", 1024), (None, 512)])
def test_defaults_follow_the_loaded_model_family(family, resolution):
    config = default_config(family, "bf16")
    assert config.resolution == resolution
    assert (config.lora_rank, config.lora_alpha, config.unet_lr) == (16, 8.0, 1e-4)
    assert (config.epochs, config.batch_size, config.save_every_n_epochs) == (10, 1, 1)
    assert config.cache_latents and config.mixed_precision == "bf16"
    assert config.logging_dir is None  # a relative "logs" would land in the WebUI's working folder


@pytest.mark.parametrize(("cuda", "bf16", "expected"), [(False, False, "no"), (True, False, "fp16"),
                                                         (True, True, "bf16")])
def test_mixed_precision_default_depends_on_the_gpu(monkeypatch, cuda, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert gpu_mixed_precision() == expected


def test_the_form_has_every_config_key_but_the_hosts_each_with_its_docstring():
    fields = form_fields()
    names = [field.name for field in fields]
    assert names == [f.name for f in dataclasses.fields(TrainConfig) if f.name not in HOST_OWNED_KEYS]
    assert all(field.info for field in fields), [field.name for field in fields if not field.info]
    kinds = {field.name: field.kind for field in fields}
    assert kinds["cache_latents"] == "check" and kinds["epochs"] == "int" and kinds["learning_rate"] == "number"
    assert kinds["optimizer"] == "choice" and kinds["lora_alpha"] == "optional"
    assert kinds["resume"] == "optional_path" and kinds["sample_prompts"] == "lines"
    assert kinds["target_modules"] == "list"
    optimizer = next(field for field in fields if field.name == "optimizer")
    assert optimizer.choices == ("adamw", "adamw8bit", "prodigy", "lion")


def test_form_values_give_back_the_same_config():
    config = TrainConfig(train_data_dir=Path("/data/cats"), resolution=768, lora_alpha=4.0, learning_rate=1.2345678e-4,
                         optimizer="prodigy", target_modules=["to_q", "to_v"], max_train_steps=None,
                         v_parameterization=True, min_snr_gamma=5.0, sample_prompts=["a cat", "a cat, sks"],
                         logging_dir=None, flip_aug=True)
    assert config_from_form(form_values(config)) == config


def test_empty_optional_fields_mean_the_default_and_others_are_read_as_yaml():
    config = config_from_form({"lora_alpha": "", "unet_lr": "2e-4", "max_train_steps": " 300 ", "resume": "",
                               "v_parameterization": "false"})
    assert config.lora_alpha is None and config.unet_lr == 2e-4 and config.max_train_steps == 300
    assert config.resume is None and config.v_parameterization is False


def test_sample_prompts_are_one_per_line_and_module_lists_comma_separated():
    config = config_from_form({"sample_prompts": "sks, a cat\n\n  sks, a dog  \n", "target_modules": "to_q, to_k,"})
    assert config.sample_prompts == ["sks, a cat", "sks, a dog"]
    assert config.target_modules == ["to_q", "to_k"]


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
    config = TrainConfig(train_data_dir=Path("/data/cats"), lora_rank=8, sample_prompts=["sks"], logging_dir=None)
    path = save_preset(tmp_path / "presets", "cats v2", config)
    assert path == tmp_path / "presets" / "cats v2.yaml"
    assert load_config(path) == config
    assert load_preset(tmp_path / "presets", "cats v2") == config
    assert preset_names(tmp_path / "presets") == ["cats v2"]


def test_an_existing_preset_is_replaced_only_when_asked(tmp_path):
    save_preset(tmp_path, "style", TrainConfig(lora_rank=8))
    with pytest.raises(UserError, match="exists.*Overwrite"):
        save_preset(tmp_path, "style", TrainConfig(lora_rank=32))
    assert load_preset(tmp_path, "style").lora_rank == 8
    save_preset(tmp_path, "style", TrainConfig(lora_rank=32), overwrite=True)
    assert load_preset(tmp_path, "style").lora_rank == 32


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


def test_chart_json_carries_losses_saved_names_and_state():
    status = JobStatus(kind="training", state="running", losses=[(1, 0.5), (2, 0.25)], saved=[Path("/l/x.safetensors")])
    assert chart_json(status) == '{"losses": [[1, 0.5], [2, 0.25]], "saved": ["x.safetensors"], "state": "running"}'


def test_status_of_a_running_training_shows_progress_speed_eta_and_memory():
    status = JobStatus(kind="training", state="running", step=30, total_steps=120, epoch=2, losses=[(30, 0.12345)],
                       samples_per_second=2.5, seconds_left=3725, memory="1.20 GiB peak VRAM",
                       message="Saved x.safetensors")
    shown = status_html(status)
    assert 'style="width: 25.0%"' in shown
    for part in ("Training: running", "Step 30/120", "epoch 2", "loss 0.1235", "2.50 it/s", "ETA 1:02:05",
                 "1.20 GiB peak VRAM", "Saved x.safetensors"):
        assert part in shown


def test_a_failed_job_shows_its_message_as_an_error_escaped():
    shown = status_html(JobStatus(kind="training", state="failed", message="folder <x> does not exist"))
    assert 'class="lora-trainer-message lora-trainer-error"' in shown
    assert "folder &lt;x&gt; does not exist" in shown


def test_captioning_progress_counts_images():
    shown = status_html(JobStatus(kind="captioning", state="running", step=3, total_steps=8))
    assert "Captioning: running" in shown and "3/8" in shown and "ETA" not in shown


def test_idle_status_and_durations():
    assert "No job has run yet" in status_html(JobStatus())
    assert [format_duration(s) for s in (0, 59.6, 61, 3600, 36061)] == ["0:00", "1:00", "1:01", "1:00:00", "10:01:01"]


def test_saved_files_are_listed_by_name_escaped():
    assert "No file saved yet" in saved_html(JobStatus())
    shown = saved_html(JobStatus(saved=[Path("/loras/<b>.safetensors")]))
    assert "&lt;b&gt;.safetensors" in shown and "<b>" not in shown


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
            "lora_trainer_stop", "lora_trainer_save_now", "lora_trainer_caption_button"} <= elem_ids
