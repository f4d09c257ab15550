"""The Train LoRA tab in a real browser: gradio 3.41.2 as the WebUI pins it, the page script and stylesheet
injected as the WebUI injects them, a run from a dataset folder to a registered LoRA file, and the Test
panel's grid of the run's files.

Drives Debian's Chromium through Playwright; skipped where either is missing.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from browser_page import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ROOT,
    TIMEOUT_MS,
    ServedTab,
    _chart_points,
    _fill,
    _free_port,
    _input_values,
    _text,
    _value,
    _wait_for,
    _wait_in_page,
    serve_tab,
)
from PIL import Image, ImageDraw

gr = pytest.importorskip("gradio")
pytest.importorskip("ldm")
pytest.importorskip("open_clip")
if not gr.__version__.startswith("3.41."):
    pytest.skip(f"the WebUI's gradio is 3.41.x; this is {gr.__version__}", allow_module_level=True)
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from caption_models import TINY_CLIP, TINY_COCA, register_tiny_configs, save_tiny_checkpoint  # noqa: E402
from fake_host import FakeHost  # noqa: E402
from ldm_models import learned_ldm_model  # noqa: E402
from measures import CONCEPT  # noqa: E402

from lora_trainer.config import config_from_dict, load_config  # noqa: E402
from lora_trainer.grid import DEFAULT_STRENGTHS  # noqa: E402
from lora_trainer.jobs import JobRunner  # noqa: E402
from lora_trainer.server.queue import JobQueue  # noqa: E402
from lora_trainer.tab import build_tab  # noqa: E402
from lora_trainer.tab.server import release_closing_server  # noqa: E402
from lora_trainer.world import write_concept_dataset  # noqa: E402

RELOAD_SECONDS = 20
"""How long a reload may take: the job finishes its step and saves, the server closes."""

SCREENSHOT = ROOT / "out" / "screenshots" / "train-tab.png"
TEST_PANEL_SCREENSHOT = ROOT / "out" / "screenshots" / "test-panel.png"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[ServedTab]:
    folder = tmp_path_factory.mktemp("tab")
    # As in a fresh WebUI: the default datasets folder does not exist yet.
    host = FakeHost(learned_ldm_model("sd1", folder / "model"), folder / "Lora",
                    datasets_dir=folder / "webui" / "datasets")
    with serve_tab(host, folder / "presets") as served:
        yield served


@pytest.fixture(scope="module")
def browser(served) -> Iterator:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, served):
    page = _open(browser, served)
    yield page
    page.close()


def _open(browser, served):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(served.url)
    # The page-load event fills in the loaded model's note: the tab is live once it shows.
    _wait_in_page(page, f"{_text('model_note')}.includes('SD1')", "the page-load event")
    return page


def test_the_first_visit_finds_an_empty_default_datasets_folder_not_an_error(served, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(served.url)
    datasets = served.host.datasets_dir()
    _wait_in_page(page, f"{_text('dataset_info')}.includes('put the training images there')",
                  "the empty default folder's note")
    assert datasets.is_dir() and _input_values(page, "train_data_dir") == [str(datasets)]
    assert page.locator("#lora_trainer_dataset_info .lora-trainer-error").count() == 0
    page.close()


def test_gallery_caption_edits_and_the_caption_button_write_the_txt_files(served, page, tmp_path):
    dataset = _uncaptioned_images(tmp_path / "dataset")
    (dataset / "empty.png").write_bytes(b"")  # a failed download: skipped, with the trainer's reason
    (dataset / "notes.png").write_text("not a picture", encoding="utf-8")
    register_tiny_configs(tmp_path)
    weights = save_tiny_checkpoint(TINY_CLIP, tmp_path / "clip.pt")

    _fill(page, "train_data_dir", str(dataset))
    page.click("#lora_trainer_load_dataset")
    thumbnails = page.locator("#lora_trainer_dataset_gallery .thumbnail-item")
    thumbnails.nth(3).wait_for()
    _wait_in_page(page, f"{_text('dataset_info')}.includes('2 skipped')", "the skipped files")
    assert thumbnails.count() == 4
    info = page.inner_text("#lora_trainer_dataset_info")
    assert "4 images ready to train" in info
    assert "empty.png: empty file (0 bytes)" in info and "notes.png: not an image Pillow can read" in info
    # The gallery shows cached JPEG previews, not the dataset's own (PNG) files; the editor names the image.
    assert page.locator("#lora_trainer_dataset_gallery .thumbnail-item img").first.get_attribute("src").endswith(".jpg")

    thumbnails.nth(1).click()
    _wait_in_page(page, f"{_value('selected_image')}.endsWith('01.png')", "the clicked image in the caption editor")
    assert page.locator("#lora_trainer_mask_view").is_hidden()  # no mask
    Image.new("L", (32, 32), 0).save(dataset / "00.mask.png")
    thumbnails.first.click()
    _wait_in_page(page, f"{_value('selected_image')}.endsWith('00.png')", "the clicked image in the caption editor")
    page.locator("#lora_trainer_mask_view img").wait_for()  # its loss mask over it
    _fill(page, "caption", "sks, my own words")
    page.click("#lora_trainer_save_caption")
    _wait_for(lambda: (dataset / "00.txt").is_file(), "the edited caption to be saved")
    assert (dataset / "00.txt").read_text(encoding="utf-8") == "sks, my own words"

    page.click("#lora_trainer_captioning >> text=Caption the images automatically")
    page.check("#lora_trainer_captioner input[value='clip-tags']")
    _fill(page, "caption_prefix", "sks")
    _fill(page, "caption_arch", TINY_CLIP)
    _fill(page, "caption_weights", str(weights))
    page.click("#lora_trainer_caption_button")
    _wait_in_page(page, f"{_text('status')}.includes('Captioning: finished')", "the captioning job to finish")
    captions = [(dataset / f"{index:02d}.txt").read_text(encoding="utf-8") for index in range(4)]
    assert captions[0] == "sks, my own words"  # mode "skip" keeps the existing caption
    assert all(caption.startswith("sks, ") and len(caption) > len("sks, ") for caption in captions[1:])
    _wait_in_page(page, f"!{_text('dataset_gallery')}.includes('(no caption)')",
                  "the gallery to show the new captions once the job ended")

    # CoCa with the decoding fields: greedy, at most 3 tokens (so at most 3 words after the prefix).
    coca_weights = save_tiny_checkpoint(TINY_COCA, tmp_path / "coca.pt")
    page.check("#lora_trainer_captioner input[value='coca']")
    page.check("#lora_trainer_caption_mode input[value='overwrite']")
    page.check("#lora_trainer_caption_decoding input[value='greedy']")
    _fill(page, "caption_max_tokens", "3")
    _fill(page, "caption_arch", TINY_COCA)
    _fill(page, "caption_weights", str(coca_weights))
    page.click("#lora_trainer_caption_button")
    _wait_for(lambda: (dataset / "00.txt").read_text(encoding="utf-8") != "sks, my own words",
              "the coca job to overwrite the captions")
    _wait_in_page(page, f"{_text('status')}.includes('Captioning: finished')", "the coca job to finish")
    for index in range(4):
        caption = (dataset / f"{index:02d}.txt").read_text(encoding="utf-8")
        assert caption.startswith("sks, ") and 1 <= len(caption[len("sks, "):].split()) <= 3


def test_a_run_shows_live_progress_on_every_open_page_and_stop_saves_a_registered_lora(served, browser, page,
                                                                                          tmp_path):
    dataset = _uncaptioned_images(tmp_path / "dataset")
    for image in dataset.glob("*.png"):
        image.with_suffix(".txt").write_text(f"sks, shape {image.stem}", encoding="utf-8")

    _fill(page, "train_data_dir", str(dataset))
    page.click("#lora_trainer_load_dataset")
    page.locator("#lora_trainer_dataset_gallery .thumbnail-item").nth(3).wait_for()
    _fill(page, "output_name", "tab_lora")
    _fill(page, "trigger_word", "sks")
    for name, value in {"resolution": "32", "lora_rank": "4", "lora_alpha": "4", "unet_lr": "1e-3",
                        "max_train_steps": "500", "save_every_n_epochs": "", "sample_prompts": "sks, a shape",
                        "sample_every_n_steps": "3"}.items():
        _fill(page, name, value)
    page.click("#lora_trainer_advanced >> text=Advanced")
    page.click('#lora_trainer_advanced_dataset >> text="Dataset"')  # each of the config's groups is collapsed
    _fill(page, "bucket_step", "8")
    page.click('#lora_trainer_advanced_sampling >> text="Sampling"')
    _fill(page, "sample_steps", "4")
    page.click("#lora_trainer_start")

    _wait_in_page(page, f"/Step ([3-9]|\\d\\d+)\\//.test({_text('status')})", "step 3")
    _wait_in_page(page, f"{_chart_points()} >= 3", "three points on the loss chart")
    page.locator("#lora_trainer_samples img").first.wait_for()
    assert page.locator("#lora_trainer_chart polyline").count() == 2

    # The WebUI's progress bar asks ./internal/progress through its global request() (progressbar.js), here a
    # stand-in answering as the WebUI does for a txt2img waiting behind the run: it hears what it waits for.
    page.evaluate("() => { window.request = (url, data, handler) => handler(url.endsWith('/internal/progress') ? "
                  "{active: data.id_task === 'task(active)', queued: data.id_task !== 'task(active)', "
                  "textinfo: data.id_task === 'task(active)' ? 'Sampling' : 'In queue: 1/1'} : {}); }")
    _wait_in_page(page, "window.request.explainsLoraTrainerJobs === true", "the page script to take up request()")
    progress_text = ("id => new Promise(resolve => request('./internal/progress', {id_task: id}, "
                     "response => resolve(response.textinfo)))")
    queued = page.evaluate(progress_text, "task(queued)")
    assert queued.startswith("In queue: 1/1 · waiting for LoRA training (step ")
    assert page.evaluate(progress_text, "task(active)") == "Sampling"

    # The job lives in the runner, not in the page: a page opened now (or reloaded) shows the same run, and
    # its form the run's settings (Start there would otherwise train the defaults).
    other_page = _open(browser, served)
    _wait_in_page(other_page, f"{_text('status')}.includes('Training: running')", "the run on a page opened later")
    _wait_in_page(other_page, f"{_chart_points()} >= 3", "the loss chart on a page opened later")
    other_page.locator("#lora_trainer_samples img").first.wait_for()
    assert _input_values(other_page, "train_data_dir", "output_name", "trigger_word", "resolution", "lora_rank",
                         "sample_prompts") == [str(dataset), "tab_lora", "sks", "32", "4", "sks, a shape"]
    other_page.close()

    page.click("#lora_trainer_save_now")
    _wait_in_page(page, f"{_text('saved')}.includes('tab_lora-s')", "the file saved by 'Save now'")
    _wait_for(lambda: len(served.lora_refreshes) >= 1, "the page to refresh the Lora cards after a save")
    # A WebUI started with --ckpt would reselect that checkpoint on a card refresh: the page must not press it.
    refreshes = len(served.lora_refreshes)
    served.host.lora_cards_refreshable = False
    try:
        page.click("#lora_trainer_stop")
        _wait_in_page(page, f"{_text('status')}.includes('Training: stopped')", "the stopped job")
        _wait_in_page(page, f"{_text('saved')}.includes('work in prompts now')", "the note on the Lora cards")
        assert len(served.lora_refreshes) == refreshes
    finally:
        served.host.lora_cards_refreshable = True
    _wait_in_page(page, f"!{_text('saved')}.includes('work in prompts now')", "the note to go")
    page.locator("#lora_trainer_samples img").first.wait_for()
    page.click("#lora_trainer_advanced >> text=Advanced")  # closed again, for a screenshot of the whole run
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    status = served.runner.status()
    assert status.state == "stopped" and len(status.saved) == 2
    listed = page.inner_text("#lora_trainer_saved")
    for path in status.saved:
        assert path.name in listed
        assert path.parent == served.host.lora_dir() and path.is_file()
        assert path.with_name(f"{path.stem}.preview.png").is_file()
        assert json.loads(path.with_suffix(".json").read_text())["activation text"] == "sks"
    assert served.host.registered[-2:] == [path.stem for path in status.saved]


def test_the_test_panel_renders_a_strength_grid_of_the_last_runs_files_saved_with_its_parameters(served, page,
                                                                                                 tmp_path):
    # The learned SD1 base draws red, yellow, green and blue shapes; the run teaches it a magenta "sks".
    dataset = tmp_path / "dataset"
    first_caption = write_concept_dataset(dataset, *CONCEPT)[0].with_suffix(".txt").read_text(encoding="utf-8")
    # The page came back with the last run's settings: start from the model's defaults instead.
    page.click("#lora_trainer_defaults")
    _wait_in_page(page, f"{_value('output_name')} === 'lora' && {_value('max_train_steps')} === ''", "the defaults")
    _fill(page, "train_data_dir", str(dataset))
    _fill(page, "output_name", "grid_lora")
    _fill(page, "trigger_word", "sks")
    for name, value in {"resolution": "32", "lora_rank": "8", "lora_alpha": "8", "unet_lr": "3e-3", "epochs": "40",
                        "batch_size": "4", "save_every_n_epochs": "20"}.items():
        _fill(page, name, value)
    page.click("#lora_trainer_advanced >> text=Advanced")
    page.click('#lora_trainer_advanced_dataset >> text="Dataset"')
    _fill(page, "bucket_step", "8")
    page.click("#lora_trainer_start")
    _wait_in_page(page, f"{_text('status')}.includes('Training: finished')", "the training run to finish",
                  timeout_ms=8 * TIMEOUT_MS)
    # The notice said the run started; once it has ended only the status speaks, and it says how it ended.
    _wait_in_page(page, f"!{_text('notice')}.includes('started')", "the start notice to go")
    saved = served.runner.status().saved
    assert len(saved) == 2

    # The panel is pre-filled from the run that just ended and from the host's txt2img settings.
    page.click("#lora_trainer_test >> text=Test: compare strengths and epochs in a grid")
    picked = page.locator("#lora_trainer_grid_files .token")
    _wait_in_page(page, f"{_value('grid_prompt')} === '{first_caption}'", "the caption, which holds the trigger")
    assert picked.all_inner_texts() == [path.name for path in saved]
    assert _input_values(page, "grid_strengths", "grid_sampler", "grid_steps", "grid_cfg", "grid_width",
                         "grid_height") == [DEFAULT_STRENGTHS, "DDIM", "4", "1", "32", "32"]

    _fill(page, "grid_strengths", "0, 1")
    _fill(page, "grid_steps", "20")
    _fill(page, "grid_cfg", "7.5")
    page.click("#lora_trainer_grid_button")
    _wait_in_page(page, f"{_text('status')}.includes('Grid: finished')", "the grid job to finish")
    page.locator("#lora_trainer_grid_image img").wait_for()
    cells = page.locator("#lora_trainer_grid_cells .thumbnail-item")
    cells.nth(3).wait_for()
    assert cells.count() == 4
    assert f"{saved[1].stem}, strength 1" in page.inner_text("#lora_trainer_grid_cells")
    TEST_PANEL_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.locator("#lora_trainer_test").screenshot(path=str(TEST_PANEL_SCREENSHOT))

    grid_path = served.runner.status().grid_path
    assert grid_path.parent == served.host.grids_dir()
    assert grid_path.name in page.inner_text("#lora_trainer_grid_notice")
    with Image.open(grid_path) as grid:
        parameters = grid.text["parameters"]
    assert parameters.startswith(f"{first_caption}\n")
    for part in ("Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seeds: 1, Size: 32x32", "LoRA strengths: 0, 1",
                 f"LoRAs: {saved[0].stem}, {saved[1].stem}"):
        assert part in parameters
    prompts = [request.prompt for request in served.host.renders[-4:]]
    assert prompts == [f"{first_caption}{tag}" for path in saved for tag in ("", f" <lora:{path.stem}:1>")]

    # A grid goes through the same job as training: the tab's Stop ends it, and the last grid stays up.
    _fill(page, "grid_steps", "100")
    page.click("#lora_trainer_grid_button")
    _wait_in_page(page, f"{_text('status')}.includes('Grid: running') && "
                  "!document.querySelector('#lora_trainer_stop').disabled", "the slow grid to start")
    page.click("#lora_trainer_stop")
    # The grid stops between cells: a 100-step cell can take long on a busy CPU.
    _wait_in_page(page, f"{_text('grid_notice')}.includes('grid stopped after')", "the stopped grid",
                  timeout_ms=4 * TIMEOUT_MS)
    assert "Grid: stopped" in page.inner_text("#lora_trainer_status")
    assert list(served.host.grids_dir().iterdir()) == [grid_path]
    assert page.locator("#lora_trainer_grid_image img").is_visible()


def test_a_preset_saved_from_the_form_loads_back_and_is_never_overwritten_silently(served, page):
    _fill(page, "output_name", "preset_lora")
    _fill(page, "lora_rank", "12")
    page.click("#lora_trainer_presets >> text=Presets")
    _fill(page, "preset_name", "my style")
    page.click("#lora_trainer_save_preset")
    _wait_in_page(page, f"{_text('notice')}.includes('Saved preset')", "the preset to be saved")
    preset = served.presets_dir / "my style.yaml"
    assert load_config(preset).network.lora_rank == 12 and load_config(preset).saving.output_name == "preset_lora"

    page.click("#lora_trainer_save_preset")
    _wait_in_page(page, f"{_text('notice')}.includes('exists')", "the refusal to overwrite")
    page.click("#lora_trainer_defaults")
    _wait_in_page(page, f"{_value('lora_rank')} === '16' && {_value('output_name')} === 'lora'", "the defaults")
    page.click("#lora_trainer_load_preset")  # the saved preset is the chosen one
    _wait_in_page(page, f"{_value('lora_rank')} === '12' && {_value('output_name')} === 'preset_lora'",
                  "the preset's values back in the form")


class _WebUIHost(FakeHost):
    """The fake host doing what the WebUI adapter's `busy()` does as a job ends: a server that is closing (Reload
    UI) is let go instead of waiting for the requests queued behind the job."""

    server = None

    @contextmanager
    def busy(self, job_name: str) -> Iterator:
        with super().busy(job_name) as task:
            try:
                yield task
            finally:
                release_closing_server(self.server)


def test_reload_ui_during_training_comes_back_even_with_a_slow_generation_queued_behind_it(served, browser,
                                                                                           tmp_path):
    # The WebUI's Reload UI interrupts the running job, then closes the gradio server in its main thread; uvicorn
    # waits for every open request first. Twice, as the WebUI rebuilds its UI around the same job runner: once
    # with only the tab's page polling, once with a txt2img queued behind the training that, once the training
    # lets it in, takes much longer than a reload may (as txt2img does on a CPU).
    host = _WebUIHost(served.host.model, tmp_path / "Lora")
    runner = JobRunner(host)
    dataset = _uncaptioned_images(tmp_path / "dataset")
    generation_may_end = threading.Event()
    try:
        for with_generation in (False, True):
            demo, reload_requested, generation_waits = _webui_like_demo(host, runner, generation_may_end)
            host.server = demo.server
            runner.start_training(config_from_dict(dict(
                train_data_dir=dataset, resolution=32, bucket_step=8, lora_rank=4, max_train_steps=100_000,
                output_name=f"reload{int(with_generation)}", logging_dir=None, save_every_n_epochs=None)))
            page = _open(browser, ServedTab(host, runner, tmp_path / "presets", demo.local_url, []))
            _wait_in_page(page, f"/Step [1-9]/.test({_text('status')})", "the training to run")
            if with_generation:
                page.click(".tab-nav button:has-text('txt2img')")
                page.click("#txt2img_generate")
                assert generation_waits.wait(TIMEOUT_MS / 1000), "the generation never queued behind the training"
            page.click("#reload_ui")
            assert reload_requested.wait(TIMEOUT_MS / 1000)
            closing = threading.Thread(target=demo.close, daemon=True)
            started = time.monotonic()
            closing.start()
            closing.join(RELOAD_SECONDS)
            if closing.is_alive():
                demo.server.force_exit = True
                closing.join()
                pytest.fail(f"the server took over {RELOAD_SECONDS} s to close for the reload "
                            f"({'with' if with_generation else 'without'} a generation queued)")
            assert time.monotonic() - started < RELOAD_SECONDS
            status = runner.wait(TIMEOUT_MS / 1000)
            assert status.state == "stopped" and status.saved[-1].is_file()
            page.close()
    finally:
        generation_may_end.set()


def _webui_like_demo(host: FakeHost, runner: JobRunner, generation_may_end: threading.Event):
    """The tab in a page with a txt2img button and a Reload UI button, queued as the WebUI's are, launched.

    Returns the demo, an Event set once Reload UI was pressed (the job interrupted, as `shared.state.request_restart`
    does) and an Event set once the generation waits for the host's queue, which it then holds until
    `generation_may_end` is set.
    """
    reload_requested, generation_waits = threading.Event(), threading.Event()

    def generate() -> str:
        generation_waits.set()
        with host.queue_lock:  # call_queue.wrap_gradio_gpu_call: the WebUI's FIFO queue lock, held throughout
            generation_may_end.wait(10 * RELOAD_SECONDS)
        return "an image"

    def request_restart() -> None:
        host.task.interrupt.set()
        reload_requested.set()

    tab = build_tab(host, JobQueue(runner, host.queue_dir()))
    with gr.Blocks(analytics_enabled=False) as demo:
        with gr.Tab("Train LoRA", id="lora_trainer", elem_id="tab_lora_trainer"):
            tab.render()
        with gr.Tab("txt2img"):
            generate_button = gr.Button("Generate", elem_id="txt2img_generate")
            generate_button.click(generate, None, gr.Textbox())
        gr.Button("Reload UI", elem_id="reload_ui").click(request_restart, None, None)
    demo.queue(64)
    demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    return demo, reload_requested, generation_waits


def _uncaptioned_images(folder: Path, count: int = 4, size: int = 32) -> Path:
    folder.mkdir(parents=True)
    colours = ["red", "blue", "green", "orange"]
    for index in range(count):
        image = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(image).ellipse((4, 4, size - 4, size - 4), fill=colours[index % len(colours)])
        image.save(folder / f"{index:02d}.png")
    return folder


def test_jobs_submitted_over_http_show_in_the_tabs_queue_where_a_queued_one_is_cancelled(served, page):
    import httpx
    from conftest import write_shapes_dataset

    from lora_trainer.server.routes import api_router

    # As the WebUI's on_app_started: the API on the page's own app, over the tab's queue.
    served.app.include_router(api_router(served.queue, served.host))
    write_shapes_dataset(served.host.datasets_dir() / "api_shapes")
    settings = dict(train_data_dir="api_shapes", resolution=32, bucket_step=8, lora_rank=4)
    with httpx.Client(base_url=served.url.rstrip("/") + "/lora-trainer/v1", timeout=30) as client:
        running = client.post("/jobs", json={"kind": "train", "config": {
            **settings, "max_train_steps": 100_000, "output_name": "api_running"}}).json()
        queued = client.post("/jobs", json={"kind": "train", "config": {
            **settings, "max_train_steps": 2, "output_name": "api_queued"}}).json()
        assert (running.get("place"), queued.get("place")) == (0, 1), (running, queued)
        _wait_in_page(page, f"{_text('queue')}.includes('{queued['id']}') && {_text('status')}.includes"
                      "('Training: running')", "the API's jobs in the tab")
        assert "api_running\trunning" in page.inner_text("#lora_trainer_queue")
        assert "api_queued\tqueued" in page.inner_text("#lora_trainer_queue")

        page.click("#lora_trainer_queue_choice input")
        page.click(f"#lora_trainer_queue_choice li:has-text('{queued['id']}')")
        page.click("#lora_trainer_queue_cancel")
        _wait_in_page(page, f"{_text('queue_notice')}.includes('Cancelled job {queued['id']}')", "the cancel")
        assert client.get(f"/jobs/{queued['id']}").status_code == 404
        _wait_in_page(page, f"!{_text('queue')}.includes('{queued['id']}')", "the cancelled job to leave the table")

        client.post(f"/jobs/{running['id']}/stop")
        _wait_in_page(page, f"{_text('status')}.includes('Training: stopped')", "the stopped run in the tab")
        assert client.get(f"/jobs/{running['id']}").json()["state"] == "stopped"
    assert not (served.host.lora_dir() / "api_queued.safetensors").exists()
