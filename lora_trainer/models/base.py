"""The backend seam: everything the trainer needs from a model family, and nothing more.

Two implementations: `diffusers_backend` (a diffusers pipeline: the CLI and tests) and `webui_backend`
(the ldm/sgm model object the WebUI has loaded). The training loop, the LoRA mechanism and the export
are written once against this interface.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torch import nn

from lora_trainer.errors import UserError
from lora_trainer.models.fp8 import fp8_weights
from lora_trainer.models.layout import TransformerLayout, UNetLayout

ModelFamily = Literal["sd1", "sd2", "sdxl", "flux"]
PredictionType = Literal["epsilon", "v_prediction", "flow"]
"""What the model predicts: the noise (eps), v, or a flow-matching velocity (noise - latents; Flux)."""


@dataclass
class TextConditioning:
    """Text-encoder outputs for a batch: cross-attention states and, for SDXL, the pooled embedding."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> TextConditioning:
        """The same conditioning on `device`."""
        pooled = None if self.pooled is None else self.pooled.to(device)
        return TextConditioning(self.context.to(device), pooled)

    def __getitem__(self, index: int | slice) -> TextConditioning:
        pooled = None if self.pooled is None else self.pooled[index]
        return TextConditioning(self.context[index], pooled)

    @staticmethod
    def stack(items: list[TextConditioning], padding: torch.Tensor | None = None) -> TextConditioning:
        """Concatenate per-caption conditionings (each with batch size 1) into one batch.

        Contexts shorter than the longest are lengthened with copies of `padding` ([1, chunk, D]: the empty
        caption's context), as the WebUI pads a batch's prompts that need fewer 75-token chunks. A difference that
        is not whole chunks (Flux's T5 gives a caption of more than 255 tokens a context of its own length) is
        filled with the end of the padding: the encoded padding tokens after the empty caption's end token.
        """
        length = max(item.context.shape[1] for item in items)
        contexts = [_padded_context(item.context, length, padding) for item in items]
        pooled = None if items[0].pooled is None else torch.cat([item.pooled for item in items])
        return TextConditioning(torch.cat(contexts), pooled)


def _padded_context(context: torch.Tensor, length: int, padding: torch.Tensor | None) -> torch.Tensor:
    missing = length - context.shape[1]
    if missing == 0:
        return context
    if padding is None:
        raise ValueError(f"cannot stack a text context of {context.shape[1]} tokens with one of {length} "
                         "without padding")
    chunks = -(-missing // padding.shape[1])
    return torch.cat([context, padding.repeat(1, chunks, 1)[:, -missing:]], dim=1)


@dataclass
class LoraRoot:
    """A module tree LoRA may attach to, with the key prefixes and path namings its files use."""

    prefix: str
    """kohya prefix: lora_unet, lora_te, lora_te1, lora_te2."""
    peft_prefix: str
    """diffusers component: unet, text_encoder, text_encoder_2."""
    module: nn.Module
    is_text_encoder: bool
    kohya_path: Callable[[str], str]
    """Maps a module path inside `module` to the path that goes into the kohya key."""
    peft_path: Callable[[str], str]
    """Maps a module path inside `module` to the diffusers path of the same layer."""
    text_layers_used: int | None = None
    """A text encoder's layers whose output reaches the conditioning (those after the layer the model conditions
    on run for nothing); None: all of them."""


@dataclass
class ModelParts:
    """The model's networks: what the memory plan counts and what may leave the device after caching."""

    unet: nn.Module
    text_encoders: list[nn.Module]
    vae: nn.Module


class DiffusionBackend(ABC):
    """One loaded Stable Diffusion model, seen the way the trainer needs it."""

    family: ModelFamily
    prediction_type: PredictionType
    device: torch.device
    weight_dtype: torch.dtype
    model_name: str
    latent_scale: int
    """Pixels per latent cell along each side, including the UNet's own downsampling need."""
    parks_idle_parts: bool = True
    """Whether the run may park the VAE and frozen text encoders in CPU memory after caching (not where the host's
    own memory manager decides where its models live)."""
    fp8_base_refusal: str | None = None
    """Why `fp8_base` cannot hold this backend's UNet in fp8, as the error says it (None: it can)."""
    diffusers_names: bool = True
    """Whether the model's LoRA layers have diffusers/peft names (`save_diffusers_format`); Forge's Flux fuses q, k
    and v where diffusers' Flux splits them."""
    flow_shift: float | None = None
    """A flow-matching model's time shift mu: its training sigmas are t time-shifted as exp(mu) / (exp(mu) + 1/t - 1)
    (Flux: Forge's and kohya's shift); None for eps and v models."""
    flux_variant: str = "dev"
    """Which Flux the base is, as files name it (`flux-1-dev`, `flux-1-schnell`); unused by the other families."""
    clip_skip: int | None = None
    """The CLIP layers the text conditioning skips, counted as kohya's `clip_skip` (2: the penultimate layer),
    when the host sets it; None when it is the model's own choice."""

    def training_copy_bytes(self) -> int:
        """Bytes of weight copies the backend holds while training runs, beside the model's own weights (a host
        whose weights autograd cannot use as they are)."""
        return 0

    @property
    @abstractmethod
    def alphas_cumprod(self) -> torch.Tensor:
        """The training noise schedule (float32, on `device`) of an eps or v model."""

    @abstractmethod
    def lora_roots(self) -> list[LoraRoot]:
        """The UNet and text encoder(s) as LoRA attachment points."""

    @abstractmethod
    def model_parts(self) -> ModelParts:
        """The UNet, the text encoder(s) and the VAE."""

    @abstractmethod
    def unet_layout(self) -> UNetLayout | TransformerLayout:
        """The UNet's levels, residual blocks and transformer depths, or a diffusion transformer's blocks (Flux):
        what the memory plan counts activations from."""

    def fp8_storage(self) -> AbstractContextManager[None]:
        """The UNet's linear and convolution weights held in fp8 for the block (`fp8_base`), restored exactly
        afterwards."""
        if self.fp8_base_refusal:
            raise UserError(self.fp8_base_refusal)
        return fp8_weights(self.model_parts().unet)

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents for pixels in [-1, 1], NCHW (no gradient)."""

    @abstractmethod
    def vae_fingerprint(self) -> str:
        """A digest of the VAE's weights and the latents' dtype: latents cached on disk are reused only with
        the same one (`module_fingerprint`)."""

    @abstractmethod
    def text_encoder_fingerprint(self) -> str:
        """A digest of the text encoders' weights and of how their outputs are read (Clip skip): text outputs
        cached on disk are reused only with the same one."""

    @abstractmethod
    def encode_text(self, captions: list[str]) -> TextConditioning:
        """Text conditioning for `captions`; differentiable through text-encoder LoRA."""

    @abstractmethod
    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
                size_conditioning: torch.Tensor) -> torch.Tensor:
        """The UNet's output (noise, v or velocity, per `prediction_type`); a flow model's `timesteps` are sigmas.

        `size_conditioning` is [B, 6]: original height/width, crop top/left, target height/width (SDXL uses it).
        """

    @abstractmethod
    @contextmanager
    def training_mode(self, gradient_checkpointing: bool) -> Iterator[None]:
        """Freeze every base weight and prepare for training; on exit restore exactly the previous state."""

    @abstractmethod
    def generate(self, prompt: str, negative_prompt: str, seed: int, steps: int, width: int, height: int,
                 guidance_scale: float) -> Image.Image:
        """One image from the model as it is now (with any attached LoRA)."""


def module_fingerprint(module: torch.nn.Module, *extra: object) -> str:
    """A sha256 digest of a module's weights (names, dtypes, shapes, values) and `extra`."""
    digest = hashlib.sha256(repr(extra).encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolve_device(name: str | None) -> torch.device:
    """`name` as a device, or CUDA when available and the CPU otherwise; a device this machine does not have
    is a `UserError`, raised before any model is loaded."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"Unknown device {name!r}. Use cuda, cuda:N or cpu.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"Device {name} was asked for, but this PyTorch sees no CUDA GPU. Use --device cpu, or "
                        "install a PyTorch build with CUDA.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"Device {name} was asked for, but this machine has {torch.cuda.device_count()} CUDA "
                        "GPU(s), counted from cuda:0.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"Device {name} was asked for, but this PyTorch has no Apple GPU (MPS). Use --device cpu.")
    if device.type not in ("cuda", "cpu", "mps"):
        raise UserError(f"Device {name} cannot train here. Use cuda, cuda:N or cpu.")
    return device


@contextmanager
def frozen_parameters(modules: list[nn.Module]) -> Iterator[None]:
    """Set requires_grad=False on every parameter of `modules` and put them in eval mode, then restore each
    flag and each submodule's train/eval mode as it was."""
    flags = [(parameter, parameter.requires_grad) for module in modules for parameter in module.parameters()]
    # Every submodule's own mode: a tree may mix train and eval (ldm overrides `train` on its frozen stages).
    modes = [(submodule, submodule.training) for module in modules for submodule in module.modules()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        for module in modules:
            module.eval()
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for submodule, was_training in modes:
            submodule.training = was_training
