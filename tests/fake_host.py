"""A small stand-in for the WebUI host: the one thing the tests fake.

It implements `lora_trainer.host.Host` over a tiny real `ldm` model, the way the A1111 adapter does over
`shared.sd_model`: a non-reentrant lock for the generation queue, recorded progress, Interrupt and
stop-generating flags, a LoRA folder, and txt2img that understands `<lora:name:weight>` tags by applying those files.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from lora_trainer.grid import LORA_TAG, tag_renderer
from lora_trainer.host import HostBusy, RenderDefaults, RenderRequest
from lora_trainer.models.base import DiffusionBackend, ModelFamily
from lora_trainer.models.webui_backend import WebUIBackend


@dataclass
class FakeTask:
    """Records what a job showed on the host's progress bar."""

    updates: list[tuple[int, int, str]] = field(default_factory=list)
    images: int = 0
    interrupt: threading.Event = field(default_factory=threading.Event)
    stop_generating: threading.Event = field(default_factory=threading.Event)
    """The host's "stop after the current item" (A1111's Interrupt with "Don't Interrupt in the middle")."""

    def update(self, step: int, total: int, text: str, image: Image.Image | None = None) -> None:
        self.updates.append((step, total, text))
        self.images += image is not None

    def interrupted(self) -> bool:
        return self.interrupt.is_set()

    def stop_requested(self) -> bool:
        return self.stop_generating.is_set()


class FakeHost:
    """The WebUI as the trainer sees it, around a tiny ldm model."""

    def __init__(self, model: nn.Module, lora_dir: Path, family: ModelFamily = "sd1", resolution: int = 32,
                 datasets_dir: Path | None = None, api_auth: str | None = None):
        self.model = model
        self.family = family
        self._lora_dir = Path(lora_dir)
        self._lora_dir.mkdir(parents=True, exist_ok=True)
        self.queue_lock = threading.Lock()
        self.task = FakeTask()
        self.registered: list[str] = []
        self.forgotten: list[str] = []
        self.lora_cards_refreshable = True
        """False plays a WebUI started with --ckpt, where a card refresh would reselect that checkpoint."""
        self.renders: list[RenderRequest] = []
        self.resolution = resolution
        self._datasets_dir = datasets_dir
        self.api_credentials = api_auth

    def model_family(self) -> ModelFamily | None:
        return self.family

    def loaded_model_backend(self) -> DiffusionBackend:
        if not self.queue_lock.locked():
            raise AssertionError("loaded_model_backend() must be called inside busy()")
        return WebUIBackend(self.model, generate_image=self._generate_for_backend, model_name="tiny-ldm")

    @contextmanager
    def busy(self, job_name: str) -> Iterator[FakeTask]:
        if not self.queue_lock.acquire(blocking=False):
            raise HostBusy("the model is busy")
        self.task = FakeTask()
        try:
            yield self.task
        finally:
            self.queue_lock.release()

    def render(self, request: RenderRequest) -> Image.Image:
        if not self.queue_lock.locked():
            raise AssertionError("render() must be called inside busy()")
        self.renders.append(request)
        backend = WebUIBackend(self.model, generate_image=self._sample, model_name="tiny-ldm")
        files = {name: self._lora_dir / f"{name}.safetensors" for name, _ in LORA_TAG.findall(request.prompt)}
        return tag_renderer(backend, files)(request)

    def render_defaults(self) -> RenderDefaults:
        return RenderDefaults(sampler_name="DDIM", steps=4, cfg_scale=1.0, width=self.resolution,
                              height=self.resolution)

    def lora_dir(self) -> Path:
        return self._lora_dir

    def datasets_dir(self) -> Path | None:
        return self._datasets_dir

    def queue_dir(self) -> Path:
        return self._lora_dir.parent / "lora_trainer_queue"

    def api_auth(self) -> str | None:
        return self.api_credentials

    def register_lora(self, path: Path) -> None:
        self.registered.append(Path(path).stem)

    def forget_lora(self, path: Path) -> None:
        self.forgotten.append(Path(path).stem)

    def can_refresh_lora_cards(self) -> bool:
        return self.lora_cards_refreshable

    def grids_dir(self) -> Path:
        return self._lora_dir.parent / "grids"

    def _generate_for_backend(self, prompt, negative_prompt, seed, steps, width, height, guidance_scale):
        return self.render(RenderRequest(prompt, negative_prompt, seed, steps, guidance_scale, width, height))

    def _sample(self, prompt, negative_prompt, seed, steps, width, height, guidance_scale):
        return ddim_sample(self.model, prompt, seed, steps, width, height, negative_prompt, guidance_scale)


@torch.no_grad()
def ddim_sample(model, prompt: str, seed: int, steps: int, width: int, height: int, negative_prompt: str = "",
                guidance_scale: float = 1.0) -> Image.Image:
    """Deterministic DDIM (eta 0), with classifier-free guidance when `guidance_scale` is not 1, as the WebUI
    samples: enough to see what a LoRA does to the tiny model."""
    context = model.get_learned_conditioning([prompt])
    uncond = model.get_learned_conditioning([negative_prompt]) if guidance_scale != 1 else None
    alphas = model.alphas_cumprod.float()
    scale = 2 ** (model.first_stage_model.encoder.num_resolutions - 1)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 4, height // scale, width // scale), generator=generator)
    timesteps = torch.linspace(len(alphas) - 1, 0, steps).long()
    for index, timestep in enumerate(timesteps):
        alpha = alphas[timestep]
        output = model.apply_model(latents, timestep.reshape(1), context)
        if uncond is not None:
            unconditioned = model.apply_model(latents, timestep.reshape(1), uncond)
            output = unconditioned + guidance_scale * (output - unconditioned)
        if model.parameterization == "v":
            predicted_noise = alpha.sqrt() * output + (1 - alpha).sqrt() * latents
        else:
            predicted_noise = output
        clean = (latents - (1 - alpha).sqrt() * predicted_noise) / alpha.sqrt()
        next_alpha = alphas[timesteps[index + 1]] if index + 1 < len(timesteps) else torch.tensor(1.0)
        latents = next_alpha.sqrt() * clean + (1 - next_alpha).sqrt() * predicted_noise
    pixels = model.decode_first_stage(latents)[0].clamp(-1, 1)
    array = ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    return Image.fromarray(array)
