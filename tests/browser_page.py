"""Helpers for the tab's browser tests: the page served as the WebUI serves it, and waits on what it shows."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lora_trainer.host import Host
from lora_trainer.jobs import JobRunner
from lora_trainer.server.queue import JobQueue
from lora_trainer.tab import build_tab

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000


class ServedTab:
    """The tab served on 127.0.0.1 with the fake host, its job queue and runner, presets folder and Lora card
    refreshes; `app` is the FastAPI app that serves the page (the `app` of the WebUI's `on_app_started`)."""

    def __init__(self, host: Host, runner: JobRunner, presets_dir: Path, url: str, lora_refreshes: list[int],
                 queue: JobQueue | None = None, app=None):
        self.host, self.runner, self.presets_dir, self.url = host, runner, presets_dir, url
        self.lora_refreshes, self.queue, self.app = lora_refreshes, queue, app


@contextmanager
def serve_tab(host: Host, presets_dir: Path) -> Iterator[ServedTab]:
    """The tab on a page of its own, with the page script and stylesheet injected as the WebUI injects them."""
    import gradio as gr
    import gradio.routes

    queue = JobQueue(JobRunner(host), host.queue_dir())
    queue.start()
    runner = queue.runner
    lora_refreshes: list[int] = []
    # As the WebUI does: the tab is built outside any Blocks, then rendered inside the page's tabs.
    tab = build_tab(host, queue, presets_dir=presets_dir)
    with gr.Blocks(analytics_enabled=False) as demo:
        with gr.Tab("Train LoRA", id="lora_trainer", elem_id="tab_lora_trainer"):
            tab.render()
        # The WebUI's hidden Lora-card refresh button, which the page script clicks after a save.
        refresh = gr.Button(visible=False, elem_id="txt2img_lora_extra_refresh_internal")
        refresh.click(lambda: lora_refreshes.append(1), None, None, queue=False)
    demo.queue(64)  # as the WebUI: shared.demo.queue(64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gradio.routes.templates, "TemplateResponse", _with_extension_assets(
            gradio.routes.templates.TemplateResponse))
        demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
        try:
            yield ServedTab(host, runner, presets_dir, demo.local_url, lora_refreshes, queue, demo.server_app)
        finally:
            runner.stop()
            runner.wait(60)
            # uvicorn otherwise waits, now and then forever, for a connection the closed browser left open.
            demo.server.force_exit = True
            demo.close()


def _text(name: str) -> str:
    return f"(document.querySelector('#lora_trainer_{name}')?.innerText ?? '')"


def _value(name: str) -> str:
    return f"(document.querySelector('#lora_trainer_{name} textarea, #lora_trainer_{name} input')?.value ?? '')"


def _input_values(page, *names: str) -> list[str]:
    return [page.locator(f"#lora_trainer_{name}").locator("textarea, input").first.input_value() for name in names]


def _chart_points() -> str:
    return "Number(document.querySelector('#lora_trainer_chart .lora-trainer-chart')?.dataset.points ?? 0)"


def _wait_in_page(page, condition: str, what: str, timeout_ms: float = TIMEOUT_MS) -> None:
    """Wait for the JavaScript expression `condition`; on timeout say what the tab showed."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"() => {condition}", timeout=timeout_ms)
    except PlaywrightTimeout:
        shown = {name: page.inner_text(f"#lora_trainer_{name}") for name in ("status", "notice", "dataset_info")}
        raise AssertionError(f"timed out waiting for {what}; the tab showed {shown}") from None


def _fill(page, field: str, value: str) -> None:
    page.locator(f"#lora_trainer_{field}").locator("textarea, input").first.fill(value)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT_MS / 1000) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _with_extension_assets(template_response):
    """gradio's page template with the extension's script in <head> and its stylesheet before </body>,
    as the WebUI's `ui_gradio_extensions.reload_javascript` does."""
    script = (ROOT / "javascript" / "lora_trainer.js").read_text(encoding="utf-8")
    style = (ROOT / "style.css").read_text(encoding="utf-8")

    def response(*args, **kwargs):
        page = template_response(*args, **kwargs)
        page.body = page.body.replace(b"</head>", f"<script>{script}</script></head>".encode())
        page.body = page.body.replace(b"</body>", f"<style>{style}</style></body>".encode())
        page.init_headers()
        return page

    return response


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
