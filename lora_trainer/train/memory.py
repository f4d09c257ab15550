"""The memory plan: a run's peak GPU memory, estimated before it starts, and the setting that brings it under
what the device has free.

The estimate's parts are computed from the model and the settings: the weights that stay on the device (their
bytes counted from the model's own tensors), the LoRA with its gradients and optimizer state, the activations
autograd keeps for the backward pass (counted per UNet block from the UNet's layout, `activation_elements`, or
per block of a diffusion transformer, `transformer_activation_elements`), and a workspace allowance. The
UNet's activation count follows what PyTorch saves: a convolution keeps its input even when frozen, a frozen
linear layer keeps nothing, GroupNorm, LayerNorm and SiLU keep their inputs, fused attention keeps q, k, v and
its output, LoRA keeps its layer's input. Checked against a meta-device trace of autograd's saved tensors for
the full-size SD1.5, SD2 and SDXL UNets in fp32 (tests/test_memory.py): within 8% (measured -2% to +5%). Under
fp16/bf16 autocast the normalisation inputs count at fp32, as autocast's op lists say (not traced: the meta
device has no autocast). Flux's blocks are counted from a trace (`DOUBLE_BLOCK_ELEMENTS`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lora_trainer.config import NetworkConfig, TrainConfig
from lora_trainer.data.dataset import vae_images_per_call
from lora_trainer.lora.network import LoraNetwork
from lora_trainer.lora.targets import find_lora_targets, matches_targets, network_from_file
from lora_trainer.models.base import DiffusionBackend
from lora_trainer.models.layout import TransformerLayout, UNetLayout
from lora_trainer.train.samples import sample_prompts

GIB = 2**30
CONTEXT_TOKENS = 77
WORKSPACE_BYTES = GIB // 2
"""cuBLAS/cuDNN workspaces and the allocator's rounding: an allowance, not a count."""
FRAGMENTATION = 0.10
"""The caching allocator's blocks are rarely full: this share of the activations is added to the workspace."""
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "lion": 4, "adafactor": 1, "dadaptation": 12,
                         "adamw_schedulefree": 8}
"""Optimizer state per trained parameter: AdamW keeps two fp32 moments, AdamW8bit two 8-bit ones, Prodigy four
tensors, Lion one, Adafactor factored rows and columns (about nothing for LoRA's thin matrices)."""
TEXT_ENCODER_ELEMENTS_PER_TOKEN_WIDTH = 14
"""Saved elements per token, layer and unit of width of a CLIP layer under LoRA: two LayerNorm inputs, the
LoRA'd attention input, q, k, v, the attention output, the MLP's input, hidden (4x) and activation (4x)."""


@dataclass(frozen=True)
class ModelFootprint:
    """What the estimate needs to know about a loaded model."""

    unet_bytes: int
    unet_fp8_bytes: int
    """The UNet's bytes with its linear and convolution weights stored as fp8 (`fp8_base`); `unet_bytes` where
    the backend cannot."""
    text_encoder_bytes: int
    vae_bytes: int
    text_encoder_width_layers: int
    """The text encoders' width times their layers, summed (what their activations scale with)."""
    layout: UNetLayout | TransformerLayout
    vae_scale: int
    """Pixels per latent cell along each side."""
    lora_parameters: int
    """Parameters of the LoRA network the config asks for."""
    parks_idle_parts: bool = True
    """The VAE and frozen text encoders leave the device after caching (`DiffusionBackend.parks_idle_parts`)."""
    resident_bytes: int = 0
    """Bytes of the model already on the training device (they count as available: the run reuses them)."""
    training_copy_bytes: int = 0
    """Bytes of weight copies the backend holds while the run lasts (`DiffusionBackend.training_copy_bytes`:
    Forge's plain copies of its inference-mode weights)."""
    vae_encoder_bytes_per_pixel: float | None = None
    """The most bytes the VAE's encoder holds at once per input pixel (`vae_bytes_per_pixel`); None when it could
    not be traced (the caching peak is then not estimated)."""
    vae_decoder_bytes_per_pixel: float | None = None
    """The same for the decoder, per output pixel (the sampling peak)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """A run's estimated peak memory, in bytes, by part."""

    weights: int
    lora: int
    """LoRA parameters, their gradients and the optimizer's state."""
    activations: int
    workspace: int

    @property
    def total(self) -> int:
        """The estimated peak."""
        return self.weights + self.lora + self.activations + self.workspace

    def describe(self) -> str:
        """`~7.9 GB (weights 2.1, LoRA and optimizer 0.1, activations 5.2, workspace 0.5)`."""
        return (f"~{gigabytes(self.total)} GB (weights {gigabytes(self.weights)}, LoRA and optimizer "
                f"{gigabytes(self.lora)}, activations {gigabytes(self.activations)}, workspace "
                f"{gigabytes(self.workspace)})")


@dataclass(frozen=True)
class Suggestion:
    """Setting changes (flat config keys) that lower the estimate, with the estimate they give."""

    changes: dict[str, Any]
    words: str
    estimate: MemoryEstimate


@dataclass(frozen=True)
class PhasePeak:
    """A peak outside the training steps (caching the latents, rendering samples) that is higher than theirs."""

    name: str
    estimate: MemoryEstimate
    remedy: str
    """What lowers it, as the plan line says it when it does not fit."""


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate, the memory the device has for the run (None: not known, e.g. on the CPU) and, when the
    estimate does not fit, the cheapest change found that makes it fit (or all the savers together); the higher
    peaks before and between the steps."""

    estimate: MemoryEstimate
    available: int | None
    suggestion: Suggestion | None = None
    phase_peaks: tuple[PhasePeak, ...] = ()

    @property
    def fits(self) -> bool:
        """Whether the estimate and every phase's peak are within the available memory (True when that is
        unknown)."""
        highest = max([self.estimate.total, *(peak.estimate.total for peak in self.phase_peaks)])
        return self.available is None or highest <= self.available

    def line(self) -> str:
        """The plan line: the estimate, the free memory, and what brings it under."""
        text = f"Memory: {self.estimate.describe()} estimated peak"
        for peak in self.phase_peaks:
            text += f"; {peak.name}: {peak.estimate.describe()}"
            if self.available is not None and peak.estimate.total > self.available:
                text += f" (too much: {peak.remedy})"
        if self.available is None:
            return text + "; the device's free memory is not known here."
        text += f", {gigabytes(self.available)} GB free for it"
        if self.fits:
            return text + "."
        text += ": probably too much (out of memory, or a slow spill into shared memory on Windows)"
        if self.estimate.total <= self.available:
            return text + "."
        if self.suggestion is None:
            return text + "; lower resolution or batch_size."
        fitting = self.suggestion.estimate.total <= self.available
        return text + f"; {self.suggestion.words}: ~{gigabytes(self.suggestion.estimate.total)} GB" + (
            "." if fitting else " (still more than free; lower resolution or batch_size too).")


def gigabytes(size: int) -> str:
    """Bytes as GB (GiB) with one decimal."""
    return f"{size / GIB:.1f}"


@dataclass(frozen=True)
class ActivationCount:
    """Elements of one sample's activations: those kept from the forward pass until the backward pass, and,
    under gradient checkpointing, those of the block being recomputed (the largest block counts). `normalised`
    says how many of either are the inputs of GroupNorm, LayerNorm and the SiLU after a GroupNorm, which
    fp16/bf16 autocast keeps in fp32."""

    kept: int
    recomputed: int
    normalised: int

    @property
    def peak(self) -> int:
        """Both together: the most alive at once."""
        return self.kept + self.recomputed

    def bytes(self, element_bytes: int) -> int:
        """The peak in bytes, `element_bytes` per element (2 under fp16/bf16 autocast, 4 in fp32), the
        normalised elements at 4."""
        return self.peak * element_bytes + self.normalised * (4 - element_bytes)


FEED_FORWARD_LORA_INPUTS = 5
"""Channels of activations per pixel that LoRA on a transformer block's feed-forward layers keeps."""


def activation_elements(layout: UNetLayout, latent_height: int, latent_width: int, checkpointing: bool,
                        conv_lora: bool = False, convolutions_keep_inputs: bool = True,
                        feed_forward_lora: bool = True, projection_lora: bool = True) -> ActivationCount:
    """What autograd keeps for the backward pass of one sample through the UNet with LoRA on its attention, its
    feed-forward layers (`feed_forward_lora`) and the transformers' projections in and out (`projection_lora`),
    as kohya's default layers are, and with `conv_lora` on its resnets, at a latent of `latent_height` x
    `latent_width`, in elements.

    With `checkpointing`, each residual and transformer block keeps only its input, and one block at a time
    recomputes its own activations in the backward pass. `convolutions_keep_inputs` off is fp8 storage, whose
    convolutions keep only their fp8 weight. The first residual block comes before any LoRA: nothing of it is
    kept."""
    pixels = latent_height * latent_width
    conv_input = 1 if convolutions_keep_inputs or conv_lora else 0
    # The attention's projections in and out: 1x1 convolutions keep their inputs, linear layers do not.
    projections = 2 * conv_input if not layout.linear_projection else 2 if projection_lora else 0
    totals = {"kept": 0, "normalised": 0}
    largest = (0, 0)  # the largest block: (elements, normalised elements)

    def add(elements: int, normalised: int = 0) -> None:
        totals["kept"] += elements
        totals["normalised"] += normalised

    def residual(channels_in: int, channels_out: int, level_pixels: int) -> tuple[int, int]:
        # Each half: GroupNorm input and SiLU input (normalised), convolution input.
        normalised = 2 * (channels_in + channels_out) * level_pixels
        return normalised + conv_input * (channels_in + channels_out) * level_pixels, normalised

    def transformer_block(channels: int, level_pixels: int) -> tuple[int, int]:
        # LayerNorm inputs (3, normalised), LoRA inputs (2 norm outputs, 2 attention outputs), self-attention q,
        # k, v and output (4), cross-attention q and output (2), GEGLU's projection (8) and GELU output (4), less
        # the attention outputs LoRA shares with them (2, as traced); and the text's keys and values.
        # LoRA on the feed-forward layers keeps their inputs too: the third norm's output and GEGLU's (4).
        feed_forward = FEED_FORWARD_LORA_INPUTS if feed_forward_lora else 0
        return (24 + feed_forward) * channels * level_pixels + 2 * CONTEXT_TOKENS * channels, \
            3 * channels * level_pixels

    def block(counted: tuple[int, int], block_input: int) -> None:
        nonlocal largest
        if checkpointing:
            add(block_input)
        else:
            add(*counted)
        largest = max(largest, counted)

    def attention(channels: int, level_pixels: int, depth: int) -> None:
        add((1 + projections) * channels * level_pixels, channels * level_pixels)  # GroupNorm input, projections
        for _ in range(depth):
            block(transformer_block(channels, level_pixels), channels * level_pixels)

    levels = len(layout.level_channels)
    skips = [layout.level_channels[0]]
    channels = layout.level_channels[0]
    for level, level_channels in enumerate(layout.level_channels):
        level_pixels = pixels // 4**level
        for index in range(layout.res_blocks):
            if level or index:
                block(residual(channels, level_channels, level_pixels), channels * level_pixels)
            channels = level_channels
            if layout.transformer_depth[level]:
                attention(channels, level_pixels, layout.transformer_depth[level])
            skips.append(channels)
        if level < levels - 1:
            add(channels * level_pixels * conv_input)  # the downsampling convolution's input
            skips.append(channels)
    level_pixels = pixels // 4 ** (levels - 1)
    block(residual(channels, channels, level_pixels), channels * level_pixels)
    if layout.middle_depth:
        attention(channels, level_pixels, layout.middle_depth)
    block(residual(channels, channels, level_pixels), channels * level_pixels)
    for level in reversed(range(levels)):
        level_channels, level_pixels = layout.level_channels[level], pixels // 4**level
        for _ in range(layout.res_blocks + 1):
            channels_in = channels + skips.pop()
            block(residual(channels_in, level_channels, level_pixels), channels_in * level_pixels)
            channels = level_channels
            if layout.transformer_depth[level]:
                attention(channels, level_pixels, layout.transformer_depth[level])
        if level > 0:
            add(channels * pixels // 4 ** (level - 1) * conv_input)  # the upsampling convolution's input
    add((2 + conv_input) * channels * pixels, 2 * channels * pixels)  # the output's GroupNorm, SiLU, convolution
    recomputed, recomputed_normalised = largest if checkpointing else (0, 0)
    return ActivationCount(totals["kept"], recomputed, totals["normalised"] + recomputed_normalised)


DOUBLE_BLOCK_ELEMENTS = 25.5
SINGLE_BLOCK_ELEMENTS = 23.4
"""Elements autograd keeps per token and unit of width for one Flux double / single stream block, with LoRA on
kohya's layers and fused attention: measured by a meta-device trace of Forge's Flux blocks (25.4-25.8 and
23.3-23.4 at 512 and 1024 px; tests/test_forge_flux.py checks the sum against a trace)."""


def transformer_activation_elements(layout: TransformerLayout, latent_height: int, latent_width: int,
                                    checkpointing: bool) -> ActivationCount:
    """What autograd keeps for the backward pass of one sample through a Flux transformer with LoRA on kohya's
    layers, at a latent of `latent_height` x `latent_width`, in elements: per block, a measured number per token
    and unit of width (image tokens and the text's). With `checkpointing`, each block keeps its input and the
    largest recomputes its own. The normalisations' inputs are not told apart (Flux's weights are 16-bit)."""
    tokens = (latent_height // layout.patch_size) * (latent_width // layout.patch_size) + layout.text_tokens
    width = tokens * layout.hidden_size
    blocks = layout.double_blocks + layout.single_blocks
    if checkpointing:
        largest = DOUBLE_BLOCK_ELEMENTS if layout.double_blocks else SINGLE_BLOCK_ELEMENTS
        return ActivationCount(blocks * width, int(largest * width), 0)
    kept = DOUBLE_BLOCK_ELEMENTS * layout.double_blocks + SINGLE_BLOCK_ELEMENTS * layout.single_blocks
    return ActivationCount(int(kept * width), 0, 0)


def estimate_memory(config: TrainConfig, footprint: ModelFootprint) -> MemoryEstimate:
    """The peak memory of training `config` on the model of `footprint`: the weights left on the device (the VAE
    and text encoders leave it after caching unless they are still needed), the LoRA with its gradients and
    optimizer state, the activations of a batch and a workspace; the backend's weight copies too."""
    training, dataset, network = config.training, config.dataset, config.network
    weights = _unet_bytes(config, footprint) + footprint.training_copy_bytes
    if network.train_text_encoder or not config.uses_text_encoder_cache or not footprint.parks_idle_parts:
        weights += footprint.text_encoder_bytes
    if not dataset.cache_latents or dataset.random_crop or not footprint.parks_idle_parts:
        weights += footprint.vae_bytes
    lora = _lora_bytes(config, footprint)
    element_bytes = 2 if training.mixed_precision != "no" else 4
    latent_side = dataset.resolution // footprint.vae_scale
    if isinstance(footprint.layout, TransformerLayout):
        model = transformer_activation_elements(footprint.layout, latent_side, latent_side,
                                                training.gradient_checkpointing)
    else:
        model = activation_elements(footprint.layout, latent_side, latent_side, training.gradient_checkpointing,
                                    conv_lora=network.effective_conv_rank > 0,
                                    feed_forward_lora=matches_targets(("ff.net.0.proj", "ff.net.2"),
                                                                      network.target_modules),
                                    projection_lora=matches_targets(("proj_in", "proj_out"), network.target_modules),
                                    convolutions_keep_inputs=not config.model.fp8_base)
    per_sample = model.bytes(element_bytes)
    if network.train_text_encoder:
        per_sample += (TEXT_ENCODER_ELEMENTS_PER_TOKEN_WIDTH * CONTEXT_TOKENS * footprint.text_encoder_width_layers
                       * element_bytes)
    activations = per_sample * training.batch_size
    workspace = WORKSPACE_BYTES + int(FRAGMENTATION * activations)
    return MemoryEstimate(weights, lora, activations, workspace)


def caching_memory(config: TrainConfig, footprint: ModelFootprint) -> MemoryEstimate | None:
    """The peak while the latents are cached (None when they are not): the whole model on the device, the LoRA,
    and the VAE's encoder on one call's images (`vae_batch_size`) at the largest bucket."""
    dataset = config.dataset
    if not dataset.cache_latents or dataset.random_crop or footprint.vae_encoder_bytes_per_pixel is None:
        return None
    side = dataset.resolution
    activations = int(footprint.vae_encoder_bytes_per_pixel * side * side * vae_images_per_call(dataset, (side, side)))
    return MemoryEstimate(_all_weights(config, footprint), footprint.lora_parameters * 4, activations,
                          WORKSPACE_BYTES + int(FRAGMENTATION * activations))


def sampling_memory(config: TrainConfig, footprint: ModelFootprint) -> MemoryEstimate | None:
    """The peak while sample images render (None without sample prompts): the whole model back on the device,
    the LoRA with its optimizer state, and the VAE's decoder on the largest sample (its activations at the
    sample's size outgrow the UNet's, which run without a graph: those are not counted)."""
    prompts = sample_prompts(config)
    if not prompts or footprint.vae_decoder_bytes_per_pixel is None:
        return None
    activations = int(footprint.vae_decoder_bytes_per_pixel * max(sample.width * sample.height for sample in prompts))
    return MemoryEstimate(_all_weights(config, footprint), _lora_bytes(config, footprint), activations,
                          WORKSPACE_BYTES + int(FRAGMENTATION * activations))


def _lora_bytes(config: TrainConfig, footprint: ModelFootprint) -> int:
    """The LoRA's parameters, their gradients and the optimizer's state."""
    state_bytes = OPTIMIZER_STATE_BYTES.get(config.optimizer.optimizer_type, 8)
    return footprint.lora_parameters * (4 + 4 + state_bytes)


def _unet_bytes(config: TrainConfig, footprint: ModelFootprint) -> int:
    return footprint.unet_fp8_bytes if config.model.fp8_base else footprint.unet_bytes


def _all_weights(config: TrainConfig, footprint: ModelFootprint) -> int:
    return (_unet_bytes(config, footprint) + footprint.text_encoder_bytes + footprint.vae_bytes
            + footprint.training_copy_bytes)


def plan_memory(config: TrainConfig, footprint: ModelFootprint, available: int | None) -> MemoryPlan:
    """The estimate and, when it exceeds `available`, the first of the usual memory savers (alone, else
    together with the ones before it) that brings it under; the peaks of caching and sampling where they are
    the higher ones."""
    estimate = estimate_memory(config, footprint)
    phases = [("caching the latents first", caching_memory(config, footprint),
               "set vae_batch_size 1, one image per VAE call"),
              ("rendering samples", sampling_memory(config, footprint),
               "render smaller samples (--w and --h in the prompt) or none")]
    plan = MemoryPlan(estimate, available, phase_peaks=tuple(
        PhasePeak(name, peak, remedy) for name, peak, remedy in phases
        if peak is not None and peak.total > estimate.total))
    if available is None or estimate.total <= available:
        return plan
    combined: dict[str, Any] = {}
    words: list[str] = []
    best: Suggestion | None = None
    for changes, saver in _memory_savers(config, footprint):
        candidate = _suggestion(config, footprint, changes, saver)
        if candidate.estimate.total <= available:
            return replace(plan, suggestion=candidate)
        combined.update(changes)
        words.append(saver)
        best = _suggestion(config, footprint, combined, ", ".join(words))
        if best.estimate.total <= available:
            return replace(plan, suggestion=best)
    return replace(plan, suggestion=best)


def _suggestion(config: TrainConfig, footprint: ModelFootprint, changes: dict[str, Any], words: str) -> Suggestion:
    return Suggestion(dict(changes), words, estimate_memory(config.updated(**changes), footprint))


def _memory_savers(config: TrainConfig, footprint: ModelFootprint) -> list[tuple[dict[str, Any], str]]:
    """The changes that lower the estimate, cheapest in speed and quality first."""
    training, dataset = config.training, config.dataset
    savers: list[tuple[dict[str, Any], str]] = []
    if not training.gradient_checkpointing:
        savers.append(({"gradient_checkpointing": True}, "turn on gradient checkpointing"))
    if (not dataset.cache_latents) and not dataset.random_crop:
        savers.append(({"cache_latents": True}, "turn on cache_latents"))
    if training.mixed_precision == "no":
        savers.append(({"mixed_precision": "bf16"}, "use mixed_precision bf16"))
    if config.optimizer.optimizer_type in ("adamw", "prodigy", "dadaptation") and \
            config.optimizer.optimizer_class is None:
        savers.append(({"optimizer_type": "adamw8bit"}, "use the 8-bit AdamW optimizer (adamw8bit)"))
    if not config.model.fp8_base and footprint.unet_fp8_bytes < footprint.unet_bytes:
        savers.append(({"fp8_base": True}, "store the UNet in fp8 (fp8_base)"))
    if training.batch_size > 1:
        savers.append(({"batch_size": 1, "gradient_accumulation_steps":
                        training.batch_size * training.gradient_accumulation_steps},
                       f"use batch_size 1 with gradient_accumulation_steps "
                       f"{training.batch_size * training.gradient_accumulation_steps}"))
    return savers


def plan_run_memory(config: TrainConfig, backend: DiffusionBackend) -> MemoryPlan:
    """The memory plan of training `config` on `backend`'s model, against what its device has free now."""
    footprint = model_footprint(backend, config.network)
    return plan_memory(config, footprint, available_memory(backend.device, footprint.resident_bytes))


def model_footprint(backend: DiffusionBackend, network: NetworkConfig) -> ModelFootprint:
    """What the estimate needs from `backend`'s model, for a LoRA network as `network` describes it."""
    parts = backend.model_parts()
    layout = backend.unet_layout()
    # The model's own downsampling: a transformer's patches, a UNet's levels.
    unet_scale = layout.patch_size if isinstance(layout, TransformerLayout) else 2 ** (len(layout.level_channels) - 1)
    vae_scale = backend.latent_scale // unet_scale
    return ModelFootprint(
        unet_bytes=tensor_bytes([parts.unet]),
        unet_fp8_bytes=tensor_bytes([parts.unet]) if backend.fp8_base_refusal else fp8_bytes(parts.unet),
        text_encoder_bytes=tensor_bytes(parts.text_encoders), vae_bytes=tensor_bytes([parts.vae]),
        text_encoder_width_layers=sum(layer.normalized_shape[0] for encoder in parts.text_encoders
                                      for layer in encoder.modules() if isinstance(layer, nn.LayerNorm)) // 2,
        layout=layout, vae_scale=vae_scale,
        lora_parameters=lora_parameter_count(backend, network), parks_idle_parts=backend.parks_idle_parts,
        resident_bytes=tensor_bytes([parts.unet, *parts.text_encoders, parts.vae], backend.device),
        training_copy_bytes=backend.training_copy_bytes(),
        vae_encoder_bytes_per_pixel=vae_bytes_per_pixel(parts.vae, "encoder", vae_scale),
        vae_decoder_bytes_per_pixel=vae_bytes_per_pixel(parts.vae, "decoder", vae_scale))


VAE_TRACE_SIDE = 512


def vae_bytes_per_pixel(vae: nn.Module, part: str, vae_scale: int) -> float | None:
    """The most bytes the `part` ("encoder" or "decoder") of `vae` holds at once (its activations, in its own
    dtype), per pixel of one image: traced on a meta-device copy at 512 x 512 pixels, nothing allocated; the SD
    VAE's peaks grow exactly with the pixels (tests/test_memory.py). None when it cannot run on the meta device:
    the WebUI's xformers attention, Forge's, which asks the device how much memory is free (Forge splits its VAE
    calls to fit anyway)."""
    module = _on_meta(getattr(vae, part))
    dtype = next(module.parameters()).dtype
    side = VAE_TRACE_SIDE if part == "encoder" else VAE_TRACE_SIDE // vae_scale
    try:
        with torch.no_grad(), LiveBytes() as live:
            module(torch.empty(1, module.conv_in.in_channels, side, side, dtype=dtype, device="meta"))
    except Exception:  # the host's own attention code, run where it was never meant to: an estimate is optional
        return None
    return live.peak / VAE_TRACE_SIDE**2


class LiveBytes(TorchDispatchMode):
    """While active, the most bytes of tensors created inside it that were alive at once (`peak`): each new
    storage counts from the operation that made it until it is freed (views share their base's)."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: dict[StorageWeakRef, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        for freed in [reference for reference in self.alive if reference.expired()]:
            self.now -= self.alive.pop(freed)
        for output in tree_leaves(outputs):
            if isinstance(output, torch.Tensor):
                reference = StorageWeakRef(output.untyped_storage())
                if reference not in self.alive:
                    self.alive[reference] = output.untyped_storage().nbytes()
                    self.now += self.alive[reference]
        self.peak = max(self.peak, self.now)
        return outputs


def lora_parameter_count(backend: DiffusionBackend, network: NetworkConfig) -> int:
    """Parameters of the LoRA network `network` describes on `backend`'s model, built on meta-device stand-ins of
    its layers: nothing is allocated on the model's device and no random stream moves."""
    if network.dim_from_weights:
        with torch.random.fork_rng(devices=[]):
            lora = network_from_file(backend.lora_roots(), network.init_lora_weights)
        return sum(parameter.numel() for parameter in lora.parameters())
    stand_ins: dict[int, nn.Module] = {}
    targets = [replace(target, layer=stand_ins.setdefault(id(target.layer), _on_meta(target.layer)))
               for target in find_lora_targets(backend.lora_roots(), network)]
    return sum(parameter.numel() for parameter in LoraNetwork(targets).parameters())


def _on_meta(layer: nn.Module) -> nn.Module:
    """A copy of `layer` whose parameters and buffers are empty meta tensors of the same shapes."""
    memo = {id(tensor): (nn.Parameter(torch.empty_like(tensor, device="meta"), requires_grad=False)
                         if isinstance(tensor, nn.Parameter) else torch.empty_like(tensor, device="meta"))
            for tensor in [*layer.parameters(), *layer.buffers()]}
    return copy.deepcopy(layer, memo)


def tensor_bytes(modules: list[nn.Module], device: torch.device | None = None) -> int:
    """Bytes of the parameters and buffers of `modules` (each tensor once), only those on `device` if given."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) in seen or (device is not None and not _same_device(tensor.device, device)):
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def fp8_bytes(unet: nn.Module) -> int:
    """The UNet's bytes with the weights of its linear and convolution layers stored in one byte each."""
    stored = 0
    for layer in unet.modules():
        weight = getattr(layer, "weight", None)
        if isinstance(layer, (nn.Linear, nn.Conv2d)) and isinstance(weight, torch.Tensor):
            stored += weight.numel() * (weight.element_size() - 1)
    return tensor_bytes([unet]) - stored


def available_memory(device: torch.device, resident_bytes: int) -> int | None:
    """What a run on `device` may use: the device's free memory, the blocks PyTorch holds unused, and the
    model's bytes already there. None for a device whose free memory is not known (the CPU)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    held_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + held_unused + resident_bytes


def _same_device(first: torch.device, second: torch.device) -> bool:
    return first.type == second.type and (first.index or 0) == (second.index or 0)
