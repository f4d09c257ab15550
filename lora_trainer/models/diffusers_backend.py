"""The diffusers backend: SD1.x, SD2.x (v-prediction) and SDXL pipelines, from a folder or a single file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from lora_trainer.errors import UserError
from lora_trainer.lora.naming import UNET_PREFIX, hf_clip_path, unet_diffusers_to_compvis
from lora_trainer.models.base import (
    DiffusionBackend,
    LoraRoot,
    ModelParts,
    TextConditioning,
    frozen_parameters,
    module_fingerprint,
)
from lora_trainer.models.layout import UNetLayout, layout_of_diffusers_unet

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def load_pipeline(base_model: str, base_model_config: str | None = None, dtype: torch.dtype = torch.float32):
    """Load a diffusers pipeline from a diffusers folder or a single-file checkpoint.

    For a single file, `base_model_config` (a local diffusers folder with the same architecture) supplies
    the component configs and tokenizers, so nothing is downloaded.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(base_model).expanduser()
    if path.is_dir():
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise UserError(f"{path} is not a diffusers model folder (no model_index.json)")
        try:
            class_name = json.loads(index_file.read_text(encoding="utf-8"))["_class_name"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{index_file} is damaged (not the JSON of a diffusers model); copy the model "
                            "folder again") from None
        if "XL" in class_name:
            return StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=dtype)
        return StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        try:
            is_sdxl = _is_sdxl_checkpoint(path)
        except Exception as error:  # safetensors and pickle raise their own kinds for a file that is not theirs
            raise UserError(f"{path} is not a readable {path.suffix} checkpoint ({type(error).__name__}: "
                            f"{error}); it may be damaged or only partly downloaded: download it again") from None
        pipeline_class = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
        options = {"torch_dtype": dtype}
        if base_model_config:
            options["config"] = str(Path(base_model_config).expanduser())
        try:
            return pipeline_class.from_single_file(str(path), **options)
        except Exception as error:  # diffusers raises many kinds (hub, conversion, shape) for a file it can't use
            hint = "" if base_model_config else (
                "; without a network, set base_model_config to a local diffusers folder of the same architecture")
            raise UserError(f"could not load {path} as a single-file checkpoint ({type(error).__name__}: "
                            f"{error}){hint}") from error
    raise UserError(f"base_model {base_model!r} is neither a diffusers folder nor a checkpoint file "
                    f"({', '.join(SINGLE_FILE_SUFFIXES)})")


def _is_sdxl_checkpoint(path: Path) -> bool:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as checkpoint:
            return any(key.startswith("conditioner.embedders.1") for key in checkpoint.keys())
    state = torch.load(path, map_location="meta", weights_only=True)
    state = state.get("state_dict", state)
    return any(key.startswith("conditioner.embedders.1") for key in state)


class DiffusersBackend(DiffusionBackend):
    """A diffusers `StableDiffusionPipeline` or `StableDiffusionXLPipeline` as a training backend."""

    def __init__(self, pipeline, device: torch.device | str, weight_dtype: torch.dtype = torch.float32,
                 model_name: str = "", v_parameterization: bool | None = None, clip_skip: int | None = None):
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.model_name = str(model_name or pipeline.name_or_path or "diffusers-model")
        self.unet = pipeline.unet
        self.text_encoders = [pipeline.text_encoder] + (
            [pipeline.text_encoder_2] if getattr(pipeline, "text_encoder_2", None) is not None else [])
        self.tokenizers = [pipeline.tokenizer] + (
            [pipeline.tokenizer_2] if getattr(pipeline, "tokenizer_2", None) is not None else [])
        if self.unet.config.get("addition_embed_type") == "text_time":
            self.family = "sdxl"
        elif pipeline.text_encoder.config.hidden_act == "gelu":  # OpenCLIP-H, converted
            self.family = "sd2"
        else:
            self.family = "sd1"
        if clip_skip is not None and self.family == "sdxl":
            raise UserError("clip_skip applies to SD1 and SD2 only: SDXL is always conditioned on the penultimate "
                            "layers of its text encoders; leave clip_skip out")
        self.clip_skip = clip_skip
        scheduler_prediction = pipeline.scheduler.config.get("prediction_type", "epsilon")
        if v_parameterization is not None:
            scheduler_prediction = "v_prediction" if v_parameterization else "epsilon"
        self.prediction_type = "v_prediction" if scheduler_prediction == "v_prediction" else "epsilon"
        vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        unet_scale = 2 ** (len(self.unet.config.block_out_channels) - 1)
        self.latent_scale = vae_scale * unet_scale
        self._vae_scale_factor = pipeline.vae.config.scaling_factor
        self._alphas_cumprod = _training_alphas_cumprod(pipeline.scheduler.config).to(self.device)
        pipeline.to(self.device, weight_dtype)
        pipeline.vae.to(torch.float32)  # the SD VAEs overflow in fp16
        pipeline.set_progress_bar_config(disable=True)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def lora_roots(self) -> list[LoraRoot]:
        if self.family == "sdxl":
            layers = self.unet.config.layers_per_block
            with_attention = {index for index, block in enumerate(self.unet.up_blocks)
                              if hasattr(block, "attentions")}
            unet_path = partial(unet_diffusers_to_compvis, layers_per_block=layers,
                                up_blocks_with_attention=with_attention)
            prefixes = ["lora_te1", "lora_te2"]
        else:
            unet_path = str
            prefixes = ["lora_te"]
        roots = [LoraRoot(UNET_PREFIX, "unet", self.unet, is_text_encoder=False, kohya_path=unet_path,
                          peft_path=str)]
        roots += [LoraRoot(prefix, component, encoder, is_text_encoder=True, kohya_path=hf_clip_path,
                           peft_path=hf_clip_path, text_layers_used=self._text_layers_used(index, encoder))
                  for index, (prefix, component, encoder) in enumerate(
                      zip(prefixes, ["text_encoder", "text_encoder_2"], self.text_encoders))]
        return roots

    def _text_layers_used(self, index: int, encoder: nn.Module) -> int | None:
        """How many of text encoder `index`'s layers reach the conditioning `encode_text` builds."""
        layers = encoder.config.num_hidden_layers
        if self.family == "sdxl":
            return layers - 1 if index == 0 else None  # the second's last layer makes the pooled output
        return layers - self.clip_skip + 1 if self.clip_skip and self.clip_skip > 1 else None

    def model_parts(self) -> ModelParts:
        return ModelParts(self.unet, list(self.text_encoders), self.pipeline.vae)

    def unet_layout(self) -> UNetLayout:
        return layout_of_diffusers_unet(self.unet.config)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        distribution = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        return (distribution.sample() * self._vae_scale_factor).to(self.weight_dtype)

    def vae_fingerprint(self) -> str:
        return module_fingerprint(self.pipeline.vae, self.weight_dtype, self._vae_scale_factor)

    def text_encoder_fingerprint(self) -> str:
        return module_fingerprint(nn.ModuleList(self.text_encoders), self.weight_dtype, self.clip_skip,
                                  [tokenizer.model_max_length for tokenizer in self.tokenizers])

    def encode_text(self, captions: list[str]) -> TextConditioning:
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            token_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids.to(self.device)
            if self.family != "sdxl":
                if not self.clip_skip or self.clip_skip == 1:
                    return TextConditioning(encoder(token_ids)[0])
                hidden = encoder(token_ids, output_hidden_states=True).hidden_states[-self.clip_skip]
                return TextConditioning(getattr(encoder, "text_model", encoder).final_layer_norm(hidden))
            output = encoder(token_ids, output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's projected pooled output (text_embeds)
        return TextConditioning(torch.cat(hidden_states, dim=-1), pooled)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
                size_conditioning: torch.Tensor) -> torch.Tensor:
        added = None
        if self.family == "sdxl":
            added = {"text_embeds": text.pooled, "time_ids": size_conditioning.to(self.device, text.context.dtype)}
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=text.context,
                         added_cond_kwargs=added).sample

    @contextmanager
    def training_mode(self, gradient_checkpointing: bool) -> Iterator[None]:
        # Only the UNet is checkpointed: transformers' text-encoder checkpointing leaves an input hook
        # behind on the embeddings, and the encoders are small next to the UNet.
        with frozen_parameters([self.unet, self.pipeline.vae, *self.text_encoders]):
            checkpointing_before = self.unet.is_gradient_checkpointing
            if gradient_checkpointing and not checkpointing_before:
                self.unet.enable_gradient_checkpointing()
            try:
                yield
            finally:
                if gradient_checkpointing and not checkpointing_before:
                    self.unet.disable_gradient_checkpointing()

    @torch.no_grad()
    def generate(self, prompt: str, negative_prompt: str, seed: int, steps: int, width: int, height: int,
                 guidance_scale: float) -> Image.Image:
        generator = torch.Generator("cpu").manual_seed(seed)
        settings = dict(num_inference_steps=steps, width=width, height=height, guidance_scale=guidance_scale,
                        generator=generator)
        if self.family == "sdxl":
            return self.pipeline(prompt, negative_prompt=negative_prompt or None, **settings).images[0]
        # SD1/SD2 sample on the conditioning they train on (clip_skip included: diffusers' own clip_skip needs
        # transformers' `text_model` level, which transformers 5 removed). An empty negative prompt encodes "",
        # as the pipeline does.
        return self.pipeline(prompt_embeds=self.encode_text([prompt]).context,
                             negative_prompt_embeds=self.encode_text([negative_prompt]).context,
                             **settings).images[0]


def _training_alphas_cumprod(scheduler_config) -> torch.Tensor:
    """The DDPM schedule the model was trained with (SD uses "scaled_linear" betas)."""
    steps = scheduler_config.get("num_train_timesteps", 1000)
    beta_start = scheduler_config.get("beta_start", 0.00085)
    beta_end = scheduler_config.get("beta_end", 0.012)
    if scheduler_config.get("beta_schedule", "scaled_linear") == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).float()
