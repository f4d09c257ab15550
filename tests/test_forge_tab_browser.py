"""The Train LoRA tab in a real browser on gradio 4 (Forge pins 4.40.0), with the fake Forge host around a tiny
model of Forge's own classes: a dataset in the gallery, a caption edit, a run to a registered LoRA file, and the
Test panel's grid of that file through Forge's own LoRA loader.

Drives Debian's Chromium through Playwright; skipped where either, gradio 4 or Forge's source is missing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from browser_page import (
    CHROMIUM,
    CHROMIUM_ARGS,
    TIMEOUT_MS,
    ServedTab,
    _fill,
    _text,
    _value,
    _wait_in_page,
    serve_tab,
)

gr = pytest.importorskip("gradio")
if not gr.__version__.startswith("4."):
    pytest.skip(f"Forge's gradio is 4.x; this is {gr.__version__}", allow_module_level=True)
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from conftest import write_shapes_dataset  # noqa: E402
from forge_models import tiny_forge_engine  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[ServedTab]:
    from fake_forge_host import FakeForgeHost

    from lora_trainer.tiny import write_clip_tokenizer_files

    folder = tmp_path_factory.mktemp("forge-tab")
    engine = tiny_forge_engine("sd1", write_clip_tokenizer_files(folder / "tokenizer"))
    host = FakeForgeHost(engine, folder / "Lora", datasets_dir=folder / "webui" / "datasets")
    with serve_tab(host, folder / "presets") as served:
        yield served


@pytest.fixture
def page(served) -> Iterator:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = chromium.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(served.url)
            _wait_in_page(page, f"{_text('model_note')}.includes('SD1')", "the page-load event")
            yield page
        finally:
            chromium.close()


def test_on_gradio_4_a_run_from_the_gallery_to_a_grid_through_forges_lora_loader(served, page, tmp_path):
    dataset = write_shapes_dataset(tmp_path / "dataset")
    _fill(page, "train_data_dir", str(dataset))
    page.click("#lora_trainer_load_dataset")
    _wait_in_page(page, f"{_text('dataset_info')}.includes('4 images ready to train')", "the dataset's summary")
    thumbnails = page.locator("#lora_trainer_dataset_gallery .thumbnail-item")
    thumbnails.nth(3).wait_for()
    thumbnails.nth(1).click()
    _wait_in_page(page, f"{_value('caption')}.startsWith('sks, a ')", "the clicked image's caption")
    _fill(page, "caption", "sks, a shape seen in gradio 4")
    page.click("#lora_trainer_save_caption")
    _wait_in_page(page, f"{_text('dataset_notice')}.includes('Saved 01.txt')", "the saved caption")
    assert (dataset / "01.txt").read_text(encoding="utf-8") == "sks, a shape seen in gradio 4"

    _fill(page, "output_name", "forge_tab")
    _fill(page, "trigger_word", "sks")
    for name, value in {"resolution": "32", "lora_rank": "4", "lora_alpha": "4", "unet_lr": "5e-2",
                        "max_train_steps": "6", "save_every_n_epochs": ""}.items():
        _fill(page, name, value)
    page.click("#lora_trainer_advanced >> text=Advanced")
    page.click('#lora_trainer_advanced_dataset >> text="Dataset"')
    _fill(page, "bucket_step", "8")
    page.click("#lora_trainer_start")
    _wait_in_page(page, f"{_text('status')}.includes('Training: finished')", "the training run to finish",
                  timeout_ms=4 * TIMEOUT_MS)
    saved = served.runner.status().saved
    assert [path.name for path in saved] == ["forge_tab.safetensors"]
    assert served.host.registered[-1] == "forge_tab"

    page.click("#lora_trainer_test >> text=Test: compare strengths and epochs in a grid")
    _fill(page, "grid_strengths", "0, 1")
    page.click("#lora_trainer_grid_button")
    _wait_in_page(page, f"{_text('status')}.includes('Grid: finished')", "the grid job to finish",
                  timeout_ms=4 * TIMEOUT_MS)
    page.locator("#lora_trainer_grid_image img").wait_for()
    cells = page.locator("#lora_trainer_grid_cells .thumbnail-item")
    cells.nth(1).wait_for()
    assert cells.count() == 2
    assert [request.prompt.endswith("<lora:forge_tab:1>") for request in served.host.renders[-2:]] == [False, True]
