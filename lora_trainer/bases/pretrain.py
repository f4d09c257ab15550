"""Pretrain the tiny bases from scratch on the synthetic world, on a CPU, and write their weights here.

    python -m lora_trainer.bases.pretrain                   # text encoders, VAE, then the sd1, sd2, sdxl UNets
    python -m lora_trainer.bases.pretrain --stage unet --family sd2

Each stage writes fp16 safetensors beside this file and appends what it measured to `pretrain-log.jsonl`.
The training math is diffusers' own (its scheduler's `add_noise` and `get_velocity`, its pipelines'
`encode_prompt` and sampling), independent of the trainer this project ships, so a bug in the trainer cannot
hide in the bases. Budgets are in steps, not seconds, so a slower machine gets the same bases.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lora_trainer.bases import (
    CLIP_FILE,
    FAMILIES,
    OPEN_CLIP_FILE,
    TEXT_ENCODER_SEEDS,
    VAE_FILE,
    VAE_SCALING_KEY,
    WEIGHTS_DIR,
    learned_pipeline,
    text_encoder_state,
    unet_file,
)
from lora_trainer.files import atomic_write
from lora_trainer.tiny import tiny_sd_pipeline
from lora_trainer.world import BASE_COLOURS, COLOURS, SHAPES, WORLD_RESOLUTION, render, scenes, what_it_shows

LOG_FILE = "pretrain-log.jsonl"
IMAGES = 10_000
VAE_STEPS, VAE_BATCH, VAE_LR = 500, 32, 1e-3
UNET_STEPS, UNET_BATCH, UNET_LR, UNET_WARMUP = 1_000, 32, 1.5e-3, 50
EMA_DECAY = 0.995
EMPTY_CAPTION_SHARE = 0.1
SDXL_SIZES = (32, 64, 512, 1024)
"""Original/target sizes the SDXL base is conditioned on, so it draws alike whatever size a host passes."""


def _pixels(colours: tuple[str, ...], seed: int, count: int = IMAGES) -> tuple[torch.Tensor, list[str]]:
    scene_list = list(scenes(seed, count, colours))
    pixels = np.stack([np.asarray(render(scene)) for scene in scene_list])
    tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    return tensor, [scene.caption for scene in scene_list]


def _save(state: dict[str, torch.Tensor], name: str, folder: Path) -> None:
    tensors = {key: tensor.detach().to(torch.float16).contiguous() for key, tensor in state.items()}
    atomic_write(folder / name, lambda tmp: save_file(tensors, str(tmp)))


def _log(folder: Path, record: dict) -> None:
    print(json.dumps(record))
    with open(folder / LOG_FILE, "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain_text_encoders(folder: Path) -> None:
    """The random, frozen text encoders: SD1's CLIP (quick_gelu) and SD2's OpenCLIP-style one (gelu, projection)."""
    for name, family in ((CLIP_FILE, "sd1"), (OPEN_CLIP_FILE, "sdxl")):
        pipeline = tiny_sd_pipeline(family, seed=TEXT_ENCODER_SEEDS[name])
        encoder = pipeline.text_encoder if name == CLIP_FILE else pipeline.text_encoder_2
        _save(text_encoder_state(encoder), name, folder)
    _log(folder, {"stage": "text", "seeds": TEXT_ENCODER_SEEDS})


def pretrain_vae(folder: Path, seed: int = 0) -> None:
    """Train the tiny KL autoencoder on every colour of the world (it is the bases' codec: it must be able to
    draw the colours the LoRAs teach), then set its latent scaling so the latents have unit variance."""
    torch.manual_seed(seed)
    started = time.time()
    pixels, _ = _pixels(tuple(COLOURS), seed)
    vae = tiny_sd_pipeline("sd1", seed=seed).vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for step in range(VAE_STEPS):
        for group in optimizer.param_groups:
            group["lr"] = VAE_LR * _cosine_lr(step, VAE_STEPS, 50)
        batch = pixels[torch.randint(0, len(pixels), (VAE_BATCH,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0:
            print(f"vae step {step}: loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        held_out, _ = _pixels(tuple(COLOURS), seed + 1, 512)
        posterior = vae.encode(held_out).latent_dist
        reconstruction_mse = F.mse_loss(vae.decode(posterior.mode()).sample, held_out).item()
        latent_std = posterior.sample().std().item()
    state = dict(vae.state_dict())
    state[VAE_SCALING_KEY] = torch.tensor(1.0 / latent_std)
    _save(state, VAE_FILE, folder)
    _log(folder, {"stage": "vae", "seed": seed, "steps": VAE_STEPS, "batch": VAE_BATCH,
                  "held_out_reconstruction_mse": round(reconstruction_mse, 5), "latent_std": round(latent_std, 4),
                  "seconds": round(time.time() - started)})


def _conditioning(pipeline, family: str, captions: list[str]) -> dict[str, torch.Tensor]:
    """Each distinct caption encoded once by the pipeline's own `encode_prompt`."""
    with torch.no_grad():
        if family == "sdxl":
            context, _, pooled, _ = pipeline.encode_prompt(captions, device="cpu", num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False)
            return {"context": context, "pooled": pooled}
        context, _ = pipeline.encode_prompt(captions, device="cpu", num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)
        return {"context": context}


def pretrain_unet(folder: Path, family: str, seed: int = 0) -> None:
    """Train `family`'s UNet from scratch on the base colours and shapes, with the VAE and text encoders
    frozen, keeping an EMA of its weights; then measure what it draws."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    started = time.time()
    pipeline = learned_pipeline(family, folder=folder, require_unet=False)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    pixels, captions = _pixels(tuple(BASE_COLOURS), seed)
    with torch.no_grad():
        posterior = torch.cat([pipeline.vae.encode(chunk).latent_dist.mean for chunk in pixels.split(512)])
    latents = posterior * pipeline.vae.config.scaling_factor
    prompts = sorted(set(captions)) + [""]
    conditioning = _conditioning(pipeline, family, prompts)
    prompt_index = torch.tensor([prompts.index(caption) for caption in captions])
    empty_index = len(prompts) - 1
    unet = pipeline.unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=UNET_LR, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    for step in range(UNET_STEPS):
        for group in optimizer.param_groups:
            group["lr"] = UNET_LR * _cosine_lr(step, UNET_STEPS, UNET_WARMUP)
        chosen = torch.randint(0, len(latents), (UNET_BATCH,), generator=generator)
        batch_latents = latents[chosen]
        rows = torch.where(torch.rand(UNET_BATCH, generator=generator) < EMPTY_CAPTION_SHARE,
                           torch.tensor(empty_index), prompt_index[chosen])
        noise = torch.randn(batch_latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (UNET_BATCH,), generator=generator)
        noisy = scheduler.add_noise(batch_latents, noise, timesteps)
        target = noise if scheduler.config.prediction_type == "epsilon" else \
            scheduler.get_velocity(batch_latents, noise, timesteps)
        added = None
        if family == "sdxl":
            sizes = [rng.choice(SDXL_SIZES) for _ in range(UNET_BATCH)]
            time_ids = torch.tensor([[size, size, 0, 0, size, size] for size in sizes], dtype=torch.float32)
            added = {"text_embeds": conditioning["pooled"][rows], "time_ids": time_ids}
        prediction = unet(noisy, timesteps, encoder_hidden_states=conditioning["context"][rows],
                          added_cond_kwargs=added).sample
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), unet.parameters()):
                averaged.lerp_(current, 1 - decay)
        if step % 100 == 0:
            print(f"{family} unet step {step}: loss {loss.item():.4f} ({time.time() - started:.0f} s)")
    seconds = time.time() - started
    _save(ema.state_dict(), unet_file(family), folder)
    competence = measure_competence(learned_pipeline(family, folder=folder), seeds=range(16))
    _log(folder, {"stage": "unet", "family": family, "seed": seed, "steps": UNET_STEPS, "batch": UNET_BATCH,
                  "seconds": round(seconds), **competence})


def measure_competence(pipeline, seeds: range, guidance_scale: float = 7.5, steps: int = 25) -> dict:
    """Draw every base colour x shape prompt for each seed; the share where the colour, the shape, or both are
    what was asked (judged by `world.what_it_shows` among the base colours)."""
    pipeline.set_progress_bar_config(disable=True)
    colour_right = shape_right = both_right = total = 0
    per_colour = {}
    for colour in BASE_COLOURS:
        right_here = 0
        for shape in SHAPES:
            images = pipeline([f"a {colour} {shape}"] * len(seeds), num_inference_steps=steps,
                              guidance_scale=guidance_scale, height=WORLD_RESOLUTION, width=WORLD_RESOLUTION,
                              generator=[torch.Generator().manual_seed(seed) for seed in seeds]).images
            for image in images:
                seen = what_it_shows(image, tuple(BASE_COLOURS))
                colour_right += seen.colour == colour
                right_here += seen.colour == colour
                shape_right += seen.shape == shape
                both_right += seen.colour == colour and seen.shape == shape
                total += 1
        per_colour[colour] = round(right_here / (len(seeds) * len(SHAPES)), 3)
    return {"images": total, "colour_right": round(colour_right / total, 3),
            "shape_right": round(shape_right / total, 3), "both_right": round(both_right / total, 3),
            "colour_right_per_colour": per_colour, "guidance_scale": guidance_scale, "sampling_steps": steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["all", "text", "vae", "unet"], default="all")
    parser.add_argument("--family", choices=FAMILIES, action="append",
                        help="with --stage unet (or all): the families to train (default: all three)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="where the weights go (default: here)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "text"):
        pretrain_text_encoders(args.out)
    if args.stage in ("all", "vae"):
        pretrain_vae(args.out, args.seed)
    if args.stage in ("all", "unet"):
        for family in args.family or FAMILIES:
            pretrain_unet(args.out, family, args.seed)


if __name__ == "__main__":
    main()
