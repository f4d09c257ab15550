"""The WebUI backend: the ldm (SD1/SD2) or sgm (SDXL) model object the AUTOMATIC1111 WebUI has loaded.

Nothing of the WebUI is imported: the backend uses only the model object's own attributes and methods
(`shared.sd_model`), so tests drive it with tiny models built from the real `ldm` classes. The host (the
WebUI tab) passes in what only it knows: whether `--lowvram` is on and how to render an image.

Text-encoder LoRA covers every encoder, under the keys kohya files and the WebUI's Lora extension use: SD1's
CLIP-L and SD2's OpenCLIP-H as `lora_te`, SDXL's CLIP-L as `lora_te1` and its OpenCLIP-bigG as `lora_te2`.
OpenCLIP layers are named as their transformers twins are (`transformer.resblocks.3.attn` is
`text_model.encoder.layers.3.self_attn`), which is how those files name them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial

import torch
from PIL import Image
from torch import nn

from lora_trainer.errors import UserError
from lora_trainer.lora.naming import UNET_PREFIX, hf_clip_path, unet_compvis_to_diffusers
from lora_trainer.models.base import (
    DiffusionBackend,
    LoraRoot,
    ModelParts,
    TextConditioning,
    frozen_parameters,
    module_fingerprint,
)
from lora_trainer.models.layout import UNetLayout, layout_of_original_unet

GenerateImage = Callable[[str, str, int, int, int, int, float], Image.Image]
"""(prompt, negative_prompt, seed, steps, width, height, guidance_scale) -> image, rendered by the host."""

SIZE_EMBEDDING_DIM = 256
"""Width of sgm's sinusoidal embedding of each SDXL size number (`ConcatTimestepEmbedderND(outdim=256)`)."""
SIZE_NUMBERS = 6
"""original height/width, crop top/left, target height/width."""
CHECKPOINTED_BLOCKS = frozenset({"ResBlock", "BasicTransformerBlock"})
"""ldm/sgm UNet blocks whose forward is recomputed in the backward pass under gradient checkpointing."""
OWN_CHECKPOINT_FLAGS = ("use_checkpoint", "checkpoint")
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}
_OPEN_CLIP_TO_HF = {"attn": "self_attn", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2", "ln_1": "layer_norm1",
                    "ln_2": "layer_norm2"}
_FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))
_ABSENT = object()


def unet_lora_root(unet: torch.nn.Module, family: str, layers_per_block: int) -> LoraRoot:
    """An original-layout (ldm/sgm) UNet as a LoRA attachment point: kohya names SD1/SD2 UNet layers with
    diffusers block names and SDXL layers with the original ones; peft always with diffusers'."""
    to_diffusers = partial(unet_compvis_to_diffusers, layers_per_block=layers_per_block)
    return LoraRoot(UNET_PREFIX, "unet", unet, is_text_encoder=False,
                    kohya_path=str if family == "sdxl" else to_diffusers, peft_path=to_diffusers)


class WebUIBackend(DiffusionBackend):
    """The WebUI's loaded `LatentDiffusion` (SD1/SD2) or `DiffusionEngine` (SDXL) as a training backend.

    `generate_image` renders sample images (the WebUI passes one that runs `process_images`);
    `model_name` is used when the model carries no `sd_checkpoint_info`; `lowvram` says the WebUI runs
    with `--lowvram`, which cannot train; `device` is where training runs (default: where the UNet is;
    the WebUI passes its `devices.device`, as `--medvram` parks the UNet on the CPU between uses);
    `clip_skip` is the WebUI's Clip skip where its prompt encoding applies it (recorded in the files).
    """

    def __init__(self, model: nn.Module, generate_image: GenerateImage | None = None, model_name: str = "",
                 lowvram: bool = False, device: torch.device | str | None = None, clip_skip: int | None = None):
        if lowvram:
            raise UserError("training is not possible with --lowvram, which moves parts of the model between CPU "
                            "and GPU in every forward pass; restart the WebUI without --lowvram (--medvram works)")
        self.model = model
        self.unet: nn.Module = model.model.diffusion_model
        if getattr(model, "is_sdxl", False):
            self.family = "sdxl"
        elif getattr(model, "is_sd2", False):
            self.family = "sd2"
        else:
            self.family = "sd1"
        _refuse_untrainable(model, self.unet, self.family)
        self.prediction_type = PREDICTION_TYPES[getattr(model, "parameterization", "eps")]
        stem_weight = self.unet.input_blocks[0][0].weight
        self.device = torch.device(device) if device is not None else stem_weight.device
        self.weight_dtype = stem_weight.dtype
        checkpoint_info = getattr(model, "sd_checkpoint_info", None)
        self.model_name = getattr(checkpoint_info, "model_name", None) or model_name or type(model).__name__
        vae_scale = 2 ** (model.first_stage_model.encoder.num_resolutions - 1)
        self.latent_scale = vae_scale * 2 ** (len(self.unet.channel_mult) - 1)
        self._layers_per_block = int(self.unet.num_res_blocks[0])
        # The WebUI may swap `alphas_cumprod` for sampling (downcast, zero terminal SNR); the original is
        # the schedule the model was trained with.
        alphas_cumprod = getattr(model, "alphas_cumprod_original", None)
        if alphas_cumprod is None:
            alphas_cumprod = model.alphas_cumprod
        self._alphas_cumprod = alphas_cumprod.detach().to(self.device, torch.float32).clone()
        self._generate_image = generate_image
        self.clip_skip = clip_skip

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def lora_roots(self) -> list[LoraRoot]:
        roots = [unet_lora_root(self.unet, self.family, self._layers_per_block)]
        if self.family == "sd1":
            embedder = _unwrapped(self.model.cond_stage_model)
            roots.append(LoraRoot("lora_te", "text_encoder", embedder.transformer, is_text_encoder=True,
                                  kohya_path=hf_clip_path, peft_path=hf_clip_path,
                                  text_layers_used=_clip_layers_used(embedder, self.clip_skip)))
        elif self.family == "sdxl":
            clip_embedder, big_g_embedder = map(_unwrapped, self.model.conditioner.embedders[:2])
            roots.append(LoraRoot("lora_te1", "text_encoder", clip_embedder.transformer, is_text_encoder=True,
                                  kohya_path=hf_clip_path, peft_path=hf_clip_path,
                                  text_layers_used=_clip_layers_used(clip_embedder, self.clip_skip)))
            roots.append(LoraRoot("lora_te2", "text_encoder_2", big_g_embedder.model, is_text_encoder=True,
                                  kohya_path=open_clip_hf_path, peft_path=open_clip_hf_path,
                                  text_layers_used=_open_clip_layers_used(big_g_embedder)))
        else:
            embedder = _unwrapped(self.model.cond_stage_model)
            roots.append(LoraRoot("lora_te", "text_encoder", embedder.model, is_text_encoder=True,
                                  kohya_path=open_clip_hf_path, peft_path=open_clip_hf_path,
                                  text_layers_used=_open_clip_layers_used(embedder)))
        return roots

    def model_parts(self) -> ModelParts:
        conditioning = self.model.conditioner if self.family == "sdxl" else self.model.cond_stage_model
        return ModelParts(self.unet, [conditioning], self.model.first_stage_model)

    def unet_layout(self) -> UNetLayout:
        return layout_of_original_unet(self.unet)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.model.first_stage_model.parameters()).dtype
        encoded = self.model.encode_first_stage(pixels.to(self.device, vae_dtype))
        return self.model.get_first_stage_encoding(encoded).to(self.weight_dtype)

    def vae_fingerprint(self) -> str:
        return module_fingerprint(self.model.first_stage_model, self.weight_dtype, self.model.scale_factor)

    def text_encoder_fingerprint(self) -> str:
        encoders = self.model.conditioner if self.family == "sdxl" else self.model.cond_stage_model
        return module_fingerprint(encoders, self.weight_dtype, self.clip_skip)

    def encode_text(self, captions: list[str]) -> TextConditioning:
        if self.family != "sdxl":
            return TextConditioning(self.model.get_learned_conditioning(captions))
        # sgm's conditioner runs frozen embedders under no_grad; text-encoder LoRA needs the graph.
        embedders = self.model.conditioner.embedders
        with temporary_attributes([(embedder, "is_trainable", True) for embedder in embedders
                                    if hasattr(embedder, "is_trainable")]):
            conditioning = self.model.get_learned_conditioning(captions)
        # The vector is the pooled text embedding followed by the embedded default sizes, rebuilt in `predict`.
        vector = conditioning["vector"]
        pooled = vector[:, :vector.shape[1] - SIZE_NUMBERS * SIZE_EMBEDDING_DIM]
        return TextConditioning(conditioning["crossattn"], pooled)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
                size_conditioning: torch.Tensor) -> torch.Tensor:
        noisy_latents = noisy_latents.to(self.device, self.weight_dtype)
        context = text.context.to(self.device, self.weight_dtype)
        if self.family != "sdxl":
            return self.model.apply_model(noisy_latents, timesteps, context)
        vector = torch.cat([text.pooled.to(self.device), self._embed_sizes(size_conditioning)], dim=1)
        return self.model.apply_model(noisy_latents, timesteps,
                                      {"crossattn": context, "vector": vector.to(self.weight_dtype)})

    @contextmanager
    def training_mode(self, gradient_checkpointing: bool) -> Iterator[None]:
        restore_merged_lora_weights(self.model)
        # ldm/sgm's own checkpoint() hands only the block's parameters to its autograd function, so LoRA
        # gradients from hooks inside the block would be lost: it is switched off during training.
        own_flags = [(module, flag, False) for module in self.unet.modules() for flag in OWN_CHECKPOINT_FLAGS
                     if isinstance(vars(module).get(flag), bool)]
        with ExitStack() as stack:
            stack.enter_context(frozen_parameters([self.model]))
            stack.enter_context(temporary_attributes(own_flags))
            if gradient_checkpointing:
                blocks = [module for module in self.unet.modules() if type(module).__name__ in CHECKPOINTED_BLOCKS]
                stack.enter_context(temporary_attributes(
                    [(block, "forward", partial(checkpointed_forward, block.forward)) for block in blocks]))
            yield

    def generate(self, prompt: str, negative_prompt: str, seed: int, steps: int, width: int, height: int,
                 guidance_scale: float) -> Image.Image:
        if self._generate_image is None:
            raise UserError("this backend has no image generator, so it cannot render sample images; "
                            "leave sample_prompts empty")
        return self._generate_image(prompt, negative_prompt, seed, steps, width, height, guidance_scale)

    def _embed_sizes(self, size_conditioning: torch.Tensor) -> torch.Tensor:
        """sgm's SDXL size vector: each of the six numbers as a 256-wide sinusoidal embedding, concatenated."""
        from ldm.modules.diffusionmodules.util import timestep_embedding

        numbers = size_conditioning.to(self.device, torch.float32)
        return timestep_embedding(numbers.flatten(), SIZE_EMBEDDING_DIM).reshape(numbers.shape[0], -1)


def restore_merged_lora_weights(model: nn.Module) -> int:
    """Undo the WebUI Lora extension's in-place merge: copy every layer's `network_weights_backup` back.

    The backups stay on the layers (the extension reuses them) and `network_current_names` is emptied, so
    the extension merges again whatever the next generation asks for. The host must also empty the
    extension's `loaded_networks`, or its patched forwards merge them back during training. Returns the
    number of layers restored.
    """
    restored = 0
    with torch.no_grad():
        for layer in model.modules():
            weights = getattr(layer, "network_weights_backup", None)
            bias = getattr(layer, "network_bias_backup", None)
            if weights is None and bias is None:
                continue
            if isinstance(layer, nn.MultiheadAttention):
                if weights is not None:
                    layer.in_proj_weight.copy_(weights[0])
                    layer.out_proj.weight.copy_(weights[1])
                if bias is not None:
                    layer.out_proj.bias.copy_(bias)
            else:
                if weights is not None:
                    layer.weight.copy_(weights)
                if bias is not None:
                    layer.bias.copy_(bias)
            layer.network_current_names = ()
            restored += 1
    return restored


def _refuse_untrainable(model: nn.Module, unet: nn.Module, family: str) -> None:
    """Raise a `UserError` that says what to do when the loaded model is one this backend cannot train."""
    parameterization = getattr(model, "parameterization", "eps")
    if parameterization not in PREDICTION_TYPES:
        raise UserError(f"the loaded model predicts {parameterization!r}; only eps and v models can be trained")
    if any(isinstance(layer, (nn.Linear, nn.Conv2d)) and layer.weight.dtype in _FP8_DTYPES for layer in unet.modules()):
        raise UserError("the loaded checkpoint is stored in FP8, which cannot be trained; turn off "
                        "Settings > Optimizations > FP8 weight, reload the checkpoint and start again")
    if unet.in_channels != unet.out_channels:
        raise UserError(f"the loaded model takes {unet.in_channels} input channels (an inpainting or instruct "
                        "model); load a plain text-to-image checkpoint to train a LoRA")
    if family == "sdxl" and not hasattr(_unwrapped(model.conditioner.embedders[0]), "transformer"):
        raise UserError("the loaded SDXL model has no CLIP-L text encoder (a refiner?); load an SDXL base model")


def _clip_layers_used(embedder: nn.Module, clip_skip: int | None) -> int | None:
    """How many layers of an ldm/sgm CLIP embedder reach its conditioning: up to its `hidden` layer (SDXL's
    first encoder), or up to the WebUI's Clip skip."""
    layers = len(embedder.transformer.text_model.encoder.layers)
    if getattr(embedder, "layer", "last") == "hidden":
        return embedder.layer_idx if embedder.layer_idx >= 0 else layers + 1 + embedder.layer_idx
    return layers - clip_skip + 1 if clip_skip and clip_skip > 1 else None


def _open_clip_layers_used(embedder: nn.Module) -> int | None:
    """How many resblocks of an ldm/sgm OpenCLIP embedder reach its conditioning: all when it also returns the
    pooled output (made from the last), else up to its penultimate layer."""
    if getattr(embedder, "always_return_pooled", False) or not getattr(embedder, "layer_idx", 0):
        return None
    return len(embedder.model.transformer.resblocks) - embedder.layer_idx


def _unwrapped(text_encoder: nn.Module) -> nn.Module:
    """The ldm/sgm encoder under the WebUI's prompt-parsing wrapper (`.wrapped`), or the encoder itself."""
    return getattr(text_encoder, "wrapped", text_encoder)


def open_clip_hf_path(path: str) -> str:
    """An open_clip text-tower path as the transformers CLIP path kohya files use for the same layer
    (`transformer.resblocks.3.mlp.c_fc` -> `text_model.encoder.layers.3.mlp.fc1`)."""
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", path)
    if not match:
        return f"text_model.{path}"
    layer = match[2]
    for open_clip_name, hf_name in _OPEN_CLIP_TO_HF.items():
        if layer == open_clip_name or layer.startswith(open_clip_name + "."):
            layer = hf_name + layer[len(open_clip_name):]
            break
    return f"text_model.encoder.layers.{match[1]}.{layer}"


def checkpointed_forward(forward: Callable, *args, **kwargs):
    """`forward(*args, **kwargs)` recomputed in the backward pass (non-reentrant torch checkpointing)."""
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextmanager
def temporary_attributes(assignments: list[tuple[object, str, object]]) -> Iterator[None]:
    """Set `target.name = value` for each assignment; afterwards restore each previous value, or remove the
    instance attribute where there was none (so a class's own method or default shows through again)."""
    undo: list[tuple[object, str, object]] = []
    try:
        for target, name, value in assignments:
            kept = name in vars(target) or isinstance(getattr(type(target), name, None), property)
            undo.append((target, name, getattr(target, name) if kept else _ABSENT))
            setattr(target, name, value)
        yield
    finally:
        for target, name, previous in reversed(undo):
            if previous is _ABSENT:
                delattr(target, name)
            else:
                setattr(target, name, previous)
