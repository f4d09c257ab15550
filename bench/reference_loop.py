"""The baseline: the LoRA loop a user writes from diffusers' and peft's documentation.

It follows diffusers' `examples/text_to_image/train_text_to_image_lora.py` (and its SDXL twin): peft's
`add_adapter` with a gaussian-initialised `LoraConfig` on the attention projections, frozen base weights in
the training dtype with fp32 LoRA weights, a torchvision transform and a `DataLoader` that reads and
tokenizes every example when it is drawn, the VAE and the text encoder(s) run on every step, plain AdamW,
gradient clipping, and the loss read back every step for the progress bar. Nothing is cached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class ReferenceSettings:
    """What the reference loop needs to know; the same values the library's trainer gets."""

    dataset: Path
    resolution: int
    batch_size: int
    rank: int
    learning_rate: float
    train_text_encoder: bool
    gradient_checkpointing: bool
    mixed_precision: str
    """"no" (fp32) or "bf16"."""
    max_steps: int
    seed: int


class CaptionedImages(torch.utils.data.Dataset):
    """Images with `.txt` captions, loaded, resized, centre-cropped and tokenized when drawn."""

    def __init__(self, folder: Path, resolution: int, tokenizers: list):
        from torchvision import transforms

        self.paths = sorted(path for path in Path(folder).iterdir() if path.suffix.lower() in (".png", ".jpg"))
        self.resolution = resolution
        self.tokenizers = tokenizers
        self.transform = transforms.Compose([
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        image = Image.open(path).convert("RGB")
        caption = path.with_suffix(".txt").read_text(encoding="utf-8")
        token_ids = [tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids[0] for tokenizer in self.tokenizers]
        scale = self.resolution / min(image.height, image.width)
        crop_top = round((image.height * scale - self.resolution) / 2)
        crop_left = round((image.width * scale - self.resolution) / 2)
        return {"pixel_values": self.transform(image), "input_ids": token_ids,
                "time_ids": torch.tensor([image.height, image.width, crop_top, crop_left,
                                          self.resolution, self.resolution], dtype=torch.float32)}


def collate(examples: list[dict]) -> dict:
    """Stack a list of examples into one batch."""
    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "input_ids": [torch.stack(ids) for ids in zip(*(example["input_ids"] for example in examples))],
            "time_ids": torch.stack([example["time_ids"] for example in examples])}


def train_reference(pipeline, settings: ReferenceSettings, device: torch.device,
                    on_step: Callable[[int, int], None]) -> float:
    """Train a UNet (and optionally text-encoder) LoRA on `pipeline` for `settings.max_steps` steps.

    `on_step(step, batch_size)` is called after every optimizer step. Returns the last loss.
    """
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    torch.manual_seed(settings.seed)
    weight_dtype = torch.bfloat16 if settings.mixed_precision == "bf16" else torch.float32
    unet, vae = pipeline.unet, pipeline.vae
    text_encoders = [pipeline.text_encoder]
    tokenizers = [pipeline.tokenizer]
    is_sdxl = getattr(pipeline, "text_encoder_2", None) is not None
    if is_sdxl:
        text_encoders.append(pipeline.text_encoder_2)
        tokenizers.append(pipeline.tokenizer_2)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)

    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False)
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=torch.float32 if is_sdxl else weight_dtype)  # the SDXL script keeps its VAE in fp32
    for encoder in text_encoders:
        encoder.to(device, dtype=weight_dtype)

    unet.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.rank, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS))
    trained = [unet]
    if settings.train_text_encoder:
        for encoder in text_encoders:
            encoder.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.rank, init_lora_weights="gaussian",
                                           target_modules=TEXT_ENCODER_TARGETS))
        trained += text_encoders
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if settings.train_text_encoder:
            for encoder in text_encoders:
                encoder.gradient_checkpointing_enable()
    lora_parameters = [p for module in trained for p in module.parameters() if p.requires_grad]
    for parameter in lora_parameters:  # diffusers' cast_training_params: LoRA weights train in fp32
        parameter.data = parameter.data.float()
    for module in trained:
        module.train()

    optimizer = torch.optim.AdamW(lora_parameters, lr=settings.learning_rate, betas=(0.9, 0.999),
                                  weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    dataloader = torch.utils.data.DataLoader(
        CaptionedImages(settings.dataset, settings.resolution, tokenizers), batch_size=settings.batch_size,
        shuffle=True, collate_fn=collate, num_workers=0, generator=torch.Generator().manual_seed(settings.seed))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.mixed_precision == "bf16")

    step, step_loss = 0, float("nan")
    while step < settings.max_steps:
        for batch in dataloader:
            pixel_values = batch["pixel_values"].to(device, dtype=vae.dtype)
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            latents = latents.to(weight_dtype)
            noise = torch.randn_like(latents)
            batch_size = latents.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,),
                                      device=latents.device).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            with autocast:
                encoder_hidden_states, added_conditions = _encode_prompt(text_encoders, batch, device, is_sdxl)
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states,
                                  added_cond_kwargs=added_conditions, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora_parameters, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            step_loss = loss.detach().item()
            step += 1
            on_step(step, batch_size)
            if step >= settings.max_steps:
                break
    return step_loss


def _encode_prompt(text_encoders: list, batch: dict, device: torch.device,
                   is_sdxl: bool) -> tuple[torch.Tensor, dict | None]:
    if not is_sdxl:
        return text_encoders[0](batch["input_ids"][0].to(device), return_dict=False)[0], None
    prompt_embeds, pooled_prompt_embeds = [], None
    for encoder, token_ids in zip(text_encoders, batch["input_ids"]):
        output = encoder(token_ids.to(device), output_hidden_states=True, return_dict=False)
        pooled_prompt_embeds = output[0]
        prompt_embeds.append(output[-1][-2])
    added = {"text_embeds": pooled_prompt_embeds, "time_ids": batch["time_ids"].to(device)}
    return torch.cat(prompt_embeds, dim=-1), added
