"""The fake host of tests/fake_host.py around a tiny Forge engine (tests/forge_models.py): it trains through
`forge_backend` (SD engines and Flux), and renders the way Forge does, with `<lora:name:weight>` tags applied by
Forge's own LoRA loader (patched clones of the patchers, merged by its memory manager) and Euler sampling of
Forge's `KModel`."""

from __future__ import annotations

import numpy as np
import torch
from fake_host import FakeHost
from PIL import Image
from safetensors.torch import load_file

from lora_trainer.grid import LORA_TAG
from lora_trainer.host import RenderRequest
from lora_trainer.models.base import DiffusionBackend
from lora_trainer.models.forge_backend import forge_backend


class FakeForgeHost(FakeHost):
    """Forge as the trainer sees it, around a tiny Forge engine (`self.model`)."""

    def loaded_model_backend(self) -> DiffusionBackend:
        if not self.queue_lock.locked():
            raise AssertionError("loaded_model_backend() must be called inside busy()")
        return forge_backend(self.model, generate_image=self._generate_for_backend, model_name="tiny-forge")

    def render(self, request: RenderRequest) -> Image.Image:
        if not self.queue_lock.locked():
            raise AssertionError("render() must be called inside busy()")
        self.renders.append(request)
        loras = [(self._lora_dir / f"{name}.safetensors", float(weight))
                 for name, weight in LORA_TAG.findall(request.prompt)]
        apply_loras_as_forge(self.model, loras)
        return euler_sample(self.model, LORA_TAG.sub("", request.prompt), request.seed, request.steps,
                            request.width, request.height)


def apply_loras_as_forge(engine, loras: list[tuple]) -> None:
    """What Forge's Lora extension does for a prompt's tags (`networks.load_networks`)."""
    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet

    wanted = str([[str(path), weight, weight, False] for path, weight in loras])
    if engine.current_lora_hash == wanted:
        return
    originals = engine.forge_objects_original
    engine.current_lora_hash = wanted
    engine.forge_objects.unet, engine.forge_objects.clip = originals.unet, originals.clip
    for path, weight in loras:
        unet, clip = engine.forge_objects.unet.clone(), engine.forge_objects.clip.clone()
        unet_patches, rest = load_lora(load_file(str(path)), model_lora_keys_unet(unet.model, {}))
        clip_patches, rest = load_lora(rest, model_lora_keys_clip(clip.cond_stage_model, {}))
        assert rest == {}, f"Forge could not place {sorted(rest)[:3]}"
        unet.add_patches(filename=str(path), patches=unet_patches, strength_patch=weight)
        clip.add_patches(filename=str(path), patches=clip_patches, strength_patch=weight)
        engine.forge_objects.unet, engine.forge_objects.clip = unet, clip


@torch.no_grad()
def euler_sample(engine, prompt: str, seed: int, steps: int, width: int, height: int) -> Image.Image:
    """Deterministic Euler sampling of Forge's current UNet patcher (its LoRA merged on load), no classifier-free
    guidance (Flux-dev gets its distilled guidance, as Forge gives it)."""
    from backend import memory_management

    unet = engine.forge_objects.unet
    conditioning = engine.get_learned_conditioning([prompt])
    memory_management.load_models_gpu([unet])
    if isinstance(conditioning, dict):
        context = conditioning["crossattn"]
        extra = {"y": conditioning["vector"]} | ({"guidance": conditioning["guidance"]} if "guidance" in conditioning
                                                 else {})
    else:
        context, extra = conditioning, {}
    predictor = unet.model.predictor
    vae = engine.forge_objects.vae
    scale = vae.downscale_ratio
    generator = torch.Generator().manual_seed(seed)
    if predictor.prediction_type == "const":  # flow matching (Flux): Forge's shifted sigmas, from 1 down
        schedule = predictor.sigmas
        sigmas = schedule[torch.linspace(len(schedule) - 1, 0, steps).round().long()]
    else:
        sigmas = predictor.sigma(torch.linspace(999, 0, steps))
    sigmas = torch.cat([sigmas, torch.zeros(1)])
    channels = vae.first_stage_model.config.latent_channels
    latents = torch.randn((1, channels, height // scale, width // scale), generator=generator) * sigmas[0]
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        denoised = unet.model.apply_model(latents, sigma.reshape(1), c_crossattn=context, transformer_options={},
                                          **extra)
        latents = latents + (latents - denoised) / sigma * (next_sigma - sigma)
    pixels = engine.decode_first_stage(latents)[0].clamp(-1, 1)
    array = ((pixels.permute(1, 2, 0).float().numpy() + 1) * 127.5).round().astype(np.uint8)
    return Image.fromarray(array)
