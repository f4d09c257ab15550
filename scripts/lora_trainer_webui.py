"""The WebUI skin: the "Train LoRA" tab, and the library's `Host` over the running WebUI's own objects:
`A1111Host` for AUTOMATIC1111, `ForgeHost` for Stable Diffusion WebUI Forge, chosen at start-up.

Everything the trainer does goes through the host: it trains `shared.sd_model` itself while holding the
WebUI's generation queue, shows progress on the WebUI's own progress API, renders with `process_images`
and registers each saved file with the built-in Lora extension. The job queue and its runner live in the library
(`lora_trainer.server.queue.process_queue`), not here: a UI reload re-imports this file, and the reloaded tab
must find a job that is still running. With `--api` (or `--nowebui`) the library's HTTP API is mounted on the
WebUI's app, over the same queue, behind `--api-auth`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from modules import call_queue, devices, paths, processing, progress, script_callbacks, sd_models, sd_samplers, shared
from PIL import Image

from lora_trainer.errors import UserError
from lora_trainer.host import HostBusy, RenderDefaults, RenderRequest
from lora_trainer.jobs import process_runner
from lora_trainer.models.base import DiffusionBackend, ModelFamily
from lora_trainer.models.forge_backend import forge_backend
from lora_trainer.models.webui_backend import WebUIBackend
from lora_trainer.server.queue import process_queue
from lora_trainer.tab import build_tab
from lora_trainer.tab.server import release_closing_server

RESTORED_AFTER_RENDER = ("job", "job_no", "job_count", "sampling_step", "sampling_steps", "textinfo",
                         "current_latent", "current_image_sampling_step", "processing_has_refined_job_count")
"""`shared.state` fields that `process_images` overwrites and the training job's progress bar relies on."""
UI_CONFIG_KEYS = {
    "sampler_name": "customscript/sampler.py/txt2img/Sampling method/value",
    "scheduler": "customscript/sampler.py/txt2img/Schedule type/value",
    "steps": "customscript/sampler.py/txt2img/Sampling steps/value",
    "cfg_scale": "txt2img/CFG Scale/value",
    "width": "txt2img/Width/value",
    "height": "txt2img/Height/value",
}
"""Where ui-config.json keeps the txt2img tab's defaults (`modules/ui_loadsave.py`; the sampler row is the
`processing_scripts/sampler.py` script, hence its `customscript/` keys)."""


class A1111Task:
    """The running job on the WebUI's progress bar (`/internal/progress`), live preview and Interrupt button."""

    def __init__(self, progress_id: str):
        self.progress_id = progress_id

    def update(self, step: int, total: int, text: str, image: Image.Image | None = None) -> None:
        shared.state.job_count = total
        shared.state.job_no = step
        shared.state.textinfo = text
        if image is not None:
            shared.state.assign_current_image(image)

    def interrupted(self) -> bool:
        return bool(shared.state.interrupted)

    def stop_requested(self) -> bool:
        # The Interrupt button under "Don't Interrupt in the middle" (the default) with job_count > 1 calls
        # state.stop_generating(): "stop after the current image", here after the current step.
        return bool(shared.state.stopping_generation)


class A1111Host:
    """`lora_trainer.host.Host` over the running AUTOMATIC1111 WebUI (v1.10)."""

    def __init__(self):
        self._holder: int | None = None
        """The thread inside `busy`, the only one allowed to train or render."""
        self._progress_id: str | None = None

    def model_family(self) -> ModelFamily | None:
        # model_data.sd_model, not shared.sd_model: asking must not load a checkpoint (--skip-load-model-at-start).
        model = sd_models.model_data.sd_model
        if model is None:
            return None
        if getattr(model, "is_sdxl", False):
            return "sdxl"
        return "sd2" if getattr(model, "is_sd2", False) else "sd1"

    def loaded_model_backend(self) -> DiffusionBackend:
        self._check_holder("loaded_model_backend")
        model = shared.sd_model  # loads the selected checkpoint if none was loaded yet, as a generation would
        if model is None:
            raise UserError("no checkpoint is loaded: choose one in the Stable Diffusion checkpoint list and wait "
                            "until it has loaded")
        lora_extension = _lora_extension()
        if lora_extension is not None:
            # The backend restores the weights a LoRA generation merged in; with nothing left in
            # loaded_networks, the extension's patched forwards do not merge them back while training runs.
            lora_extension.loaded_networks.clear()
        # The cross-attention optimization (sdp, xformers, sub-quadratic...) stays on, unlike the built-in
        # embedding/hypernetwork trainers, which call sd_hijack.undo_optimizations(): their hypernetworks
        # patch the attention function itself, while LoRA hooks the to_q/to_k/to_v/to_out layers that every
        # optimized attention still calls, and those kernels support backward with far less memory than the
        # plain attention undo_optimizations() would put back.
        return WebUIBackend(model, generate_image=self._generate_for_backend, lowvram=bool(shared.cmd_opts.lowvram),
                            device=devices.device, clip_skip=_clip_skip(self.model_family()))

    @contextlib.contextmanager
    def busy(self, job_name: str) -> Iterator[A1111Task]:
        # FIFOLock is not re-entrant and its acquire() has no timeout: never wait, so that neither a nested
        # busy() in the same thread nor a generation that runs for long can hang the job.
        if not call_queue.queue_lock.acquire(blocking=False):
            raise HostBusy("the WebUI is busy (a generation or another job is running)")
        progress_id = f"task(lora_trainer-{uuid.uuid4().hex[:10]})"
        self._holder, self._progress_id = threading.get_ident(), progress_id
        try:
            # What call_queue.wrap_gradio_gpu_call does around a txt2img request.
            shared.state.begin(job=job_name)
            progress.start_task(progress_id)
            yield A1111Task(progress_id)
        finally:
            progress.finish_task(progress_id)
            shared.state.end()
            # What call_queue.wrap_gradio_call resets after a request.
            shared.state.interrupted = shared.state.skipped = shared.state.stopping_generation = False
            self._holder = self._progress_id = None
            if release_closing_server(getattr(shared.demo, "server", None)):
                print("LoRA trainer: the UI reloads now; generations that were queued behind the job run meanwhile")
            call_queue.queue_lock.release()

    def progress_id(self) -> str | None:
        """The id under which `/internal/progress` reports the running job (for the tab's progress bar)."""
        return self._progress_id

    def render(self, request: RenderRequest) -> Image.Image:
        self._check_holder("render")
        model = shared.sd_model
        # The conditioning cache is keyed by prompt and LoRA names, not by weights: a LoRA being trained (or
        # a new file under an old name) would get stale conditioning.
        processing.StableDiffusionProcessing.cached_c = [None, None]
        processing.StableDiffusionProcessing.cached_uc = [None, None]
        # "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras"), as the txt2img tab passes them.
        sampler_name, scheduler = sd_samplers.get_sampler_and_scheduler(
            request.sampler_name or self.render_defaults().sampler_name, None, convert_automatic=False)
        job = processing.StableDiffusionProcessingTxt2Img(
            sd_model=model, prompt=request.prompt, negative_prompt=request.negative_prompt, seed=request.seed,
            sampler_name=sampler_name, scheduler=scheduler, steps=request.steps, cfg_scale=request.cfg_scale,
            width=request.width, height=request.height, do_not_save_samples=True,
            do_not_save_grid=True, do_not_reload_embeddings=True, override_settings=self._render_settings(model))
        state = shared.state
        saved = {name: getattr(state, name) for name in RESTORED_AFTER_RENDER}
        interrupted, stopping = state.interrupted, state.stopping_generation
        # process_images renders nothing once Interrupt (or its stop-after-this-image form) was pressed; the
        # stopped run's last preview still needs its image. The flags are put back afterwards.
        state.interrupted = state.stopping_generation = False
        try:
            with contextlib.closing(job):
                processed = processing.process_images(job)
        finally:
            state.interrupted = state.interrupted or interrupted
            state.stopping_generation = state.stopping_generation or stopping
            for name, value in saved.items():
                setattr(state, name, value)
        if not processed.images:
            raise UserError(f"the WebUI returned no image for {request.prompt!r}: {processed.info}")
        return processed.images[0]

    def render_defaults(self) -> RenderDefaults:
        saved = _read_ui_config(Path(shared.cmd_opts.ui_config_file))
        fallback = RenderDefaults()
        sampler_names = sd_samplers.visible_sampler_names()
        sampler_name = saved.get(UI_CONFIG_KEYS["sampler_name"]) or (sampler_names[0] if sampler_names
                                                                      else fallback.sampler_name)
        scheduler = saved.get(UI_CONFIG_KEYS["scheduler"])
        if scheduler and scheduler != "Automatic":
            # One name for both, as infotexts write them ("DPM++ 2M Karras"); render() splits it again.
            sampler_name = f"{sampler_name} {scheduler}"
        return RenderDefaults(sampler_name=sampler_name,
                              steps=int(saved.get(UI_CONFIG_KEYS["steps"], fallback.steps)),
                              cfg_scale=float(saved.get(UI_CONFIG_KEYS["cfg_scale"], fallback.cfg_scale)),
                              width=int(saved.get(UI_CONFIG_KEYS["width"], fallback.width)),
                              height=int(saved.get(UI_CONFIG_KEYS["height"], fallback.height)))

    def lora_dir(self) -> Path:
        return Path(shared.cmd_opts.lora_dir)

    def grids_dir(self) -> Path:
        # Where txt2img (and its X/Y/Z plot) saves grids: modules/txt2img.py.
        return Path(shared.opts.outdir_grids or shared.opts.outdir_txt2img_grids).absolute()

    def datasets_dir(self) -> Path | None:
        # The option is None when given no value, or missing when the extension was installed without a restart.
        chosen = getattr(shared.cmd_opts, "lora_trainer_datasets_dir", None)
        return Path(chosen) if chosen else Path(paths.data_path) / "datasets"

    def queue_dir(self) -> Path:
        return Path(paths.data_path) / "lora_trainer"

    def api_auth(self) -> str | None:
        return getattr(shared.cmd_opts, "api_auth", None) or None

    def register_lora(self, path: Path) -> None:
        lora_extension = _lora_extension()
        if lora_extension is None:
            return  # the built-in Lora extension is disabled: nothing reads the folder
        if hasattr(lora_extension, "update_available_networks_by_names"):  # A1111 1.10+, Forge
            lora_extension.update_available_networks_by_names([Path(path).stem])
        else:
            lora_extension.list_available_networks()

    def forget_lora(self, path: Path) -> None:
        lora_extension = _lora_extension()
        if lora_extension is not None:
            lora_extension.list_available_networks()  # a rescan: there is no call to drop one name

    def can_refresh_lora_cards(self) -> bool:
        # Any extra-networks refresh reruns `sd_models.list_models()`, which selects the --ckpt file again
        # whenever it exists: the next generation would silently load it. Safe when it is the selection already.
        pinned = getattr(shared.cmd_opts, "ckpt", None)
        if not pinned or not os.path.isfile(pinned):
            return True
        selected = sd_models.checkpoint_aliases.get(shared.opts.sd_model_checkpoint)  # as select_checkpoint() reads it
        return selected is not None and os.path.isfile(selected.filename) and os.path.samefile(selected.filename,
                                                                                                 pinned)

    def _render_settings(self, model) -> dict[str, str]:
        """`override_settings` for a render with the loaded model."""
        return _keep_checkpoint(model)

    def _check_holder(self, method: str) -> None:
        if self._holder != threading.get_ident():
            raise AssertionError(f"{method}() must be called by the job inside busy()")

    def _generate_for_backend(self, prompt, negative_prompt, seed, steps, width, height, guidance_scale):
        return self.render(RenderRequest(prompt, negative_prompt, seed, steps, guidance_scale, width, height))


class ForgeHost(A1111Host):
    """`lora_trainer.host.Host` over Stable Diffusion WebUI Forge (2.x, built on A1111 1.10): A1111's queue,
    progress, pipeline and Lora folder, with Forge's own model objects and memory manager."""

    def __init__(self):
        super().__init__()
        self._loaded_parameters: dict | None = None
        """Forge's loading parameters of the model the running job holds."""

    def model_family(self) -> ModelFamily | None:
        # Before the first generation Forge holds a FakeInitialModel placeholder; asking must not load.
        model = sd_models.model_data.sd_model
        if not hasattr(model, "forge_objects"):
            return None
        from backend.diffusion_engine.flux import Flux

        if isinstance(model, Flux):
            return "flux"
        if model.is_sdxl:
            return "sdxl"
        return "sd2" if model.is_sd2 else "sd1" if model.is_sd1 else None

    def loaded_model_backend(self) -> DiffusionBackend:
        self._check_holder("loaded_model_backend")
        try:
            model, _ = sd_models.forge_model_reload()  # loads the selected checkpoint, as a generation would
        except ValueError as error:  # no checkpoint at all
            raise UserError(f"no checkpoint can be loaded: {error}") from None
        self._loaded_parameters = sd_models.model_data.forge_loading_parameters
        return forge_backend(model, generate_image=self._generate_for_backend,
                             clip_skip=int(shared.opts.CLIP_stop_at_last_layers))

    @contextlib.contextmanager
    def busy(self, job_name: str) -> Iterator[A1111Task]:
        with super().busy(job_name) as task:
            try:
                yield task
            finally:
                self._loaded_parameters = None

    def render(self, request: RenderRequest) -> Image.Image:
        # A checkpoint chosen in the UI while the job runs is already in Forge's loading parameters, and
        # process_images would load it under the job; the loaded one is pinned for the render.
        model_data = sd_models.model_data
        chosen = model_data.forge_loading_parameters
        if self._loaded_parameters is not None:
            model_data.forge_loading_parameters = self._loaded_parameters
        try:
            return super().render(request)
        finally:
            model_data.forge_loading_parameters = chosen

    def _render_settings(self, model) -> dict[str, str]:
        return {}


def _is_forge() -> bool:
    """Whether the WebUI is Forge 2 (its `backend` package; reForge and older forks also ship `modules_forge`)."""
    return (importlib.util.find_spec("modules_forge") is not None
            and importlib.util.find_spec("backend.diffusion_engine") is not None)


def _keep_checkpoint(model) -> dict[str, str]:
    """`override_settings` that keep `process_images` on the loaded checkpoint.

    A checkpoint chosen in the UI while a job runs is already in `opts` (its reload waits for the queue);
    `process_images` would load it under the running job. Empty when the choice is the loaded checkpoint, so
    that `--freeze-settings` (which refuses the override's restore) keeps working.
    """
    loaded = model.sd_checkpoint_info
    if sd_models.select_checkpoint().filename == loaded.filename:
        return {}
    return {"sd_model_checkpoint": loaded.name}


def _clip_skip(family: ModelFamily | None) -> int | None:
    """The Clip skip setting where the WebUI's prompt encoding applies it: SD1's CLIP, and SDXL's CLIP-L when
    "Clip skip SDXL" is on (`sd_hijack_clip.py`); SD2's OpenCLIP ignores it."""
    if family == "sd1" or (family == "sdxl" and getattr(shared.opts, "sdxl_clip_l_skip", False) is True):
        return int(shared.opts.CLIP_stop_at_last_layers)
    return None


def _lora_extension() -> ModuleType | None:
    """The built-in Lora extension's `networks` module, imported by its own script (absent when disabled)."""
    module = sys.modules.get("networks")
    return module if hasattr(module, "loaded_networks") and hasattr(module, "list_available_networks") else None


def _read_ui_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf8"))
    except (OSError, ValueError):
        return {}  # no ui-config.json before the first UI build, or one the WebUI will report itself


HOST = ForgeHost() if _is_forge() else A1111Host()


def on_ui_tabs():
    return [(build_tab(HOST, process_queue(HOST)), "Train LoRA", "lora_trainer_tab")]


def on_app_started(demo, app):
    # As the WebUI's own API: served with --api, and always with --nowebui (where `demo` is None).
    if not (getattr(shared.cmd_opts, "api", False) or getattr(shared.cmd_opts, "nowebui", False)):
        return
    from lora_trainer.server.routes import api_router

    app.include_router(api_router(process_queue(HOST), HOST))


def on_script_unloaded():
    # A UI reload never stops a job here: the runner outlives this module, and the reloaded tab shows it.
    # (Reload UI itself presses Interrupt, `shared.state.request_restart`: a training run then saves its
    # weights and ends.)
    status = process_runner(HOST).status()
    if status.running:
        print(f"LoRA trainer: the UI reloads while a {status.kind} job runs; it goes on (or, interrupted by the "
              "reload, saves and stops) and the reloaded tab shows it")


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_script_unloaded(on_script_unloaded)
script_callbacks.on_app_started(on_app_started)
