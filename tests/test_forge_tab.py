"""The Train LoRA tab and its jobs in Forge: the fake Forge host (tests/fake_forge_host.py) around a tiny model
of Forge's own classes, on whatever gradio is installed (4.40 in the "forge" environment, as Forge pins it)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora_trainer.config import config_from_dict
from lora_trainer.host import RenderRequest
from lora_trainer.jobs import JobRunner
from lora_trainer.server.queue import JobQueue
from tests.forge_models import tiny_forge_engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from lora_trainer.tiny import write_clip_tokenizer_files

    return tiny_forge_engine("sd1", write_clip_tokenizer_files(tmp_path_factory.mktemp("forge-tokenizer")))


@pytest.fixture
def host(engine, tmp_path):
    from fake_forge_host import FakeForgeHost

    return FakeForgeHost(engine, tmp_path / "Lora")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_the_tab_builds_on_the_installed_gradio(tmp_path):
    # The tab sees only the Host interface: no model is needed to build it (nor Forge's source, which CI lacks).
    gr = pytest.importorskip("gradio")
    from fake_host import FakeHost

    from lora_trainer.tab import build_tab

    host = FakeHost(None, tmp_path / "Lora")
    tab = build_tab(host, JobQueue(JobRunner(host), host.queue_dir()))
    assert isinstance(tab, gr.Blocks)
    elem_ids = {getattr(block, "elem_id", None) for block in tab.blocks.values()}
    assert {"lora_trainer_tab", "lora_trainer_poll", "lora_trainer_start", "lora_trainer_stop",
            "lora_trainer_dataset_gallery", "lora_trainer_grid_button", "lora_trainer_grid_cells"} <= elem_ids


def test_a_training_job_in_forge_saves_a_lora_that_forge_applies_at_its_strength(host, shapes_dataset):
    runner = JobRunner(host)
    config = config_from_dict(dict(train_data_dir=shapes_dataset, resolution=32, bucket_step=8, lora_rank=4,
                                   learning_rate=5e-2, max_train_steps=6, output_name="forge-job", logging_dir=None,
                                   train_text_encoder=True))
    runner.start_training(config, trigger_word="sks", preview_prompt="sks, a red shape")
    status = runner.wait(300)
    assert status.state == "finished", status.message
    assert host.registered == ["forge-job"]
    assert status.saved[-1].with_name("forge-job.preview.png").is_file()

    def render(prompt: str) -> np.ndarray:
        with host.busy("render"):
            return _pixels(host.render(RenderRequest(prompt, seed=3, steps=4, width=32, height=32)))

    base = render("sks, a red shape")
    assert np.array_equal(render("sks, a red shape <lora:forge-job:0>"), base)
    assert np.abs(render("sks, a red shape <lora:forge-job:1>") - base).max() > 0
    assert np.array_equal(render("sks, a red shape"), base)
