"""Grids rendered through the host (the WebUI path, fake host) and through the CLI (diffusers)."""

from __future__ import annotations

import pytest
from PIL import Image

from lora_trainer.config import TrainConfig, config_from_dict
from lora_trainer.grid import GridPlan, labelled_grid


def _train_config(dataset, **overrides) -> TrainConfig:
    settings = dict(train_data_dir=dataset, resolution=32, bucket_step=8, lora_rank=4, learning_rate=5e-2,
                    max_train_steps=6, save_every_n_steps=3, output_name="style", logging_dir=None)
    settings.update(overrides)
    return config_from_dict(settings)


@pytest.fixture(scope="module")
def host_with_epochs(tmp_path_factory):
    pytest.importorskip("ldm")
    from conftest import write_shapes_dataset
    from fake_host import FakeHost
    from ldm_models import tiny_sd1

    from lora_trainer.jobs import JobRunner

    folder = tmp_path_factory.mktemp("grid-host")
    host = FakeHost(tiny_sd1(folder / "model"), folder / "Lora")
    runner = JobRunner(host)
    runner.start_training(_train_config(write_shapes_dataset(folder / "dataset")))
    status = runner.wait(120)
    assert status.state == "finished", status.message
    return host, runner, status.saved


def test_host_grid_strength_zero_column_is_the_base_image(host_with_epochs):
    from lora_trainer.host import RenderRequest

    host, runner, saved = host_with_epochs
    plan = GridPlan("sks, a red shape", saved, strengths=[0.0, 1.0], steps=4, width=32, height=32, cfg_scale=1.0)
    runner.start_grid(plan)
    status = runner.wait(120)
    assert status.state == "finished", status.message
    with host.busy("base image"):
        base = host.render(RenderRequest("sks, a red shape", seed=1, steps=4, cfg_scale=1.0, width=32, height=32))
    for row in status.grid_cells:
        assert list(row[0].getdata()) == list(base.getdata())
        assert list(row[1].getdata()) != list(base.getdata())


def test_host_grid_has_the_plan_layout_and_is_saved_with_its_parameters(host_with_epochs):
    host, runner, saved = host_with_epochs
    plan = GridPlan("sks, a red shape", saved, strengths=[0.0, 0.5, 1.0], steps=4, width=32, height=32)
    runner.start_grid(plan)
    status = runner.wait(120)
    expected = labelled_grid(status.grid_cells, ["0", "0.5", "1"], [path.stem for path in saved], title=plan.prompt,
                             corner="LoRA strength")
    assert len(status.grid_cells) == len(saved) and all(len(row) == 3 for row in status.grid_cells)
    assert status.grid.size == expected.size
    assert status.grid_path.parent == host.grids_dir()
    with Image.open(status.grid_path) as written:
        assert "LoRA strengths: 0, 0.5, 1" in written.text["parameters"]
        assert list(written.convert("RGB").getdata()) == list(expected.getdata())


def test_cli_grid_on_the_tiny_model(shapes_dataset, tmp_path, tokenizer_folder):
    pytest.importorskip("diffusers")
    from lora_trainer.cli import main
    from lora_trainer.models.diffusers_backend import DiffusersBackend, load_pipeline
    from lora_trainer.tiny import save_tiny_model
    from lora_trainer.train.loop import train

    model = save_tiny_model(tmp_path / "tiny", "sd1")
    saved = train(_train_config(shapes_dataset, output_dir=tmp_path / "loras"),
                  DiffusersBackend(load_pipeline(str(model)), "cpu")).saved
    out = tmp_path / "grid.png"
    code = main(["grid", "--base-model", str(model), "--lora", *map(str, saved), "--strengths", "0,1",
                 "--prompt", "sks, a red shape", "--steps", "3", "--width", "32", "--height", "32",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0
    with Image.open(out) as grid:
        assert grid.width > 2 * 32 and grid.height > len(saved) * 32
        assert "Seeds: 1" in grid.text["parameters"]


def test_cli_grid_renders_each_of_two_files_that_share_a_name_with_its_own_weights(shapes_dataset, tmp_path):
    pytest.importorskip("diffusers")
    from lora_trainer.cli import main
    from lora_trainer.grid import cell_box
    from lora_trainer.models.diffusers_backend import DiffusersBackend, load_pipeline
    from lora_trainer.tiny import save_tiny_model
    from lora_trainer.train.loop import train

    model = save_tiny_model(tmp_path / "tiny", "sd1")
    backend = DiffusersBackend(load_pipeline(str(model)), "cpu")
    files = [train(_train_config(shapes_dataset, output_dir=tmp_path / folder, seed=seed, max_train_steps=2,
                                 save_every_n_steps=None), backend).saved[-1] for folder, seed in (("a", 1), ("b", 2))]
    out = tmp_path / "grid.png"
    assert main(["grid", "--base-model", str(model), "--lora", *map(str, files), "--strengths", "1",
                 "--prompt", "sks, a red shape", "--steps", "3", "--width", "32", "--height", "32",
                 "--device", "cpu", "--out", str(out)]) == 0
    with Image.open(out) as grid:
        rows = [grid.convert("RGB").crop(cell_box(grid.size, 2, 1, (32, 32), row, 0)) for row in (0, 1)]
        assert "LoRAs: a/style, b/style" in grid.text["parameters"]
    assert list(rows[0].getdata()) != list(rows[1].getdata())
