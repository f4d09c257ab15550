"""The Forge backend: the model Stable Diffusion WebUI Forge has loaded (`shared.sd_model`, a
`backend.diffusion_engine` object with its `forge_objects`), trained in place.

Forge builds its layers from its own operations (`ForgeOperations.Linear` is not an `nn.Linear`); LoRA is
attached with the same forward hooks as everywhere else, which find a layer by its weight, not its class.
Forge merges a LoRA from a prompt into the weights by swapping in new parameters, keeping the originals in the
model's `lora_loader`; training first reloads the LoRA-free patchers (`forge_objects_original`) through Forge's
memory manager, whose reload puts those originals back, and afterwards Forge merges again whatever the next
prompt asks for. Forge loads its weights under `torch.inference_mode()`: the base weights that the gradient
flows through are swapped for plain copies while training runs and the originals put back afterwards.

Forge loads every text encoder as a transformers `CLIPTextModel` (SD2's OpenCLIP-H and SDXL's OpenCLIP-bigG
included), so all encoders carry the kohya names Forge's LoRA key map reads: `lora_te` (SD1, SD2),
`lora_te1` + `lora_te2` (SDXL). Forge's own `backend` package is imported only inside the methods that need
its memory manager, so that this module imports anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import torch
from PIL import Image
from torch import nn

from lora_trainer.errors import UserError
from lora_trainer.lora.naming import hf_clip_path
from lora_trainer.models.base import (
    DiffusionBackend,
    LoraRoot,
    ModelParts,
    TextConditioning,
    frozen_parameters,
    module_fingerprint,
)
from lora_trainer.models.layout import UNetLayout, layout_of_original_unet
from lora_trainer.models.webui_backend import (
    CHECKPOINTED_BLOCKS,
    SIZE_EMBEDDING_DIM,
    SIZE_NUMBERS,
    GenerateImage,
    checkpointed_forward,
    temporary_attributes,
    unet_lora_root,
)

TRAINABLE_STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, "gguf")
"""Weight storage a LoRA can be trained on. A gguf layer dequantizes its weight into a fresh tensor in each forward,
which autograd can save, so its quantized weight needs no plain copy; fp8 and nf4/fp4 (bitsandbytes) cannot be
trained here."""
QUANTIZED_KINDS = {"nf4": "nf4 (a bitsandbytes checkpoint)", "fp4": "fp4 (a bitsandbytes checkpoint)",
                   torch.float8_e4m3fn: "fp8 (float8_e4m3fn)", torch.float8_e5m2: "fp8 (float8_e5m2)"}
"""The checkpoint types behind Forge's quantized storage dtypes, as the refusal names them."""
TEXT_ENCODERS = {"sd1": [("clip_l", "lora_te", "text_encoder")], "sd2": [("clip_h", "lora_te", "text_encoder")],
                 "sdxl": [("clip_l", "lora_te1", "text_encoder"), ("clip_g", "lora_te2", "text_encoder_2")]}
"""Per family: Forge's name for each text encoder, its kohya prefix and its diffusers component."""


class ForgeBackend(DiffusionBackend):
    """Forge's loaded SD1 / SD2 / SDXL engine as a training backend.

    `generate_image` renders sample images through Forge's own pipeline; `clip_skip` is the WebUI's Clip skip
    setting, which Forge applies to every CLIP encoder (SDXL's at least at 2).
    """

    parks_idle_parts = False
    fp8_base_refusal = ("fp8_base does not work in Forge, whose UNet is built from its own operations: turn it off "
                        "(Forge's Diffusion in Low Bits stores weights in fp8 for generating, not for training)")

    def __init__(self, engine, generate_image: GenerateImage | None = None, model_name: str = "",
                 clip_skip: int | None = None):
        self.engine = engine
        self.family = _family(engine)
        self._patchers = engine.forge_objects_original
        k_model = self._patchers.unet.model
        self.unet: nn.Module = k_model.diffusion_model
        _refuse_untrainable(engine, k_model, self.unet)
        self.prediction_type = k_model.predictor.prediction_type
        self.device = torch.device(self._patchers.unet.load_device)
        self.weight_dtype = k_model.computation_dtype
        checkpoint_info = getattr(engine, "sd_checkpoint_info", None)
        self.model_name = getattr(checkpoint_info, "model_name", None) or model_name or type(engine).__name__
        vae_scale = self._patchers.vae.downscale_ratio
        self.latent_scale = vae_scale * 2 ** (len(self.unet.channel_mult) - 1)
        self._layers_per_block = int(self.unet.num_res_blocks[0])
        self._alphas_cumprod = k_model.predictor.alphas_cumprod.detach().to(self.device, torch.float32).clone()
        self._text_engines = ([engine.text_processing_engine] if self.family != "sdxl"
                              else [engine.text_processing_engine_l, engine.text_processing_engine_g])
        self._clip_skip_setting = clip_skip
        if clip_skip is None or self.family == "sdxl":
            self.clip_skip = None
        else:
            self.clip_skip = max(clip_skip, 1)
        self._generate_image = generate_image

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def lora_roots(self) -> list[LoraRoot]:
        roots = [unet_lora_root(self.unet, self.family, self._layers_per_block)]
        encoders = self._patchers.clip.cond_stage_model
        for (name, prefix, component), text_engine in zip(TEXT_ENCODERS[self.family], self._text_engines):
            transformer = getattr(encoders, name).transformer
            roots.append(LoraRoot(prefix, component, transformer, is_text_encoder=True, kohya_path=hf_clip_path,
                                  peft_path=hf_clip_path,
                                  text_layers_used=self._text_layers_used(text_engine, transformer)))
        return roots

    def _text_layers_used(self, text_engine: Any, transformer: nn.Module) -> int | None:
        """How many of a text encoder's layers reach the conditioning its engine builds (the last makes the
        pooled output, where one is returned)."""
        if text_engine.return_pooled:
            return None
        skip = max(self._clip_skip_setting or text_engine.clip_skip, text_engine.minimal_clip_skip)
        return transformer.config.num_hidden_layers - skip + 1 if skip > 1 else None

    def model_parts(self) -> ModelParts:
        return ModelParts(self.unet, [self._patchers.clip.cond_stage_model], self._patchers.vae.first_stage_model)

    def unet_layout(self) -> UNetLayout:
        return layout_of_original_unet(self.unet)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.engine.encode_first_stage(pixels.to(self.device))
        # The VAE's load may have moved the UNet or CLIP off the device to make room.
        self._load_models()
        # Forge encodes under inference_mode; a plain copy can be used by autograd.
        return latents.to(self.weight_dtype).clone()

    def vae_fingerprint(self) -> str:
        vae = self._patchers.vae.first_stage_model
        return module_fingerprint(vae, self.weight_dtype, vae.scaling_factor, vae.shift_factor)

    def text_encoder_fingerprint(self) -> str:
        return module_fingerprint(self._patchers.clip.cond_stage_model, self.weight_dtype, self._clip_skip_setting)

    def encode_text(self, captions: list[str]) -> TextConditioning:
        # Forge's get_learned_conditioning runs under inference_mode; its text engines are called directly so
        # that text-encoder LoRA gets a graph.
        if self.family != "sdxl":
            return TextConditioning(self._text_engines[0](captions).clone())
        context_l = self._text_engines[0](captions)
        context_g, pooled = self._text_engines[1](captions)
        return TextConditioning(torch.cat([context_l, context_g], dim=2).clone(), pooled.clone())

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
                size_conditioning: torch.Tensor) -> torch.Tensor:
        noisy_latents = noisy_latents.to(self.device, self.weight_dtype)
        context = text.context.to(self.device, self.weight_dtype)
        vector = None
        if self.family == "sdxl":
            vector = torch.cat([text.pooled.to(self.device), self._embed_sizes(size_conditioning)], dim=1)
            vector = vector.to(self.weight_dtype)
        # A fresh transformer_options: Forge's UNet writes into it (its default argument is a shared dict).
        return self.unet(noisy_latents, timesteps.float(), context=context, y=vector, transformer_options={})

    @contextmanager
    def training_mode(self, gradient_checkpointing: bool) -> Iterator[None]:
        engine = self.engine
        trees = self._graph_trees()
        with ExitStack() as stack:
            # The LoRA-free patchers for the run (samples render from them too); the next prompt's LoRA is
            # merged again by Forge, which reloads its own patchers.
            stack.enter_context(temporary_attributes(
                [(engine, "current_lora_hash", str([])),
                 (engine.forge_objects, "unet", self._patchers.unet),
                 (engine.forge_objects, "clip", self._patchers.clip)]
                + [(text_engine, "clip_skip", self._clip_skip_setting) for text_engine in self._text_engines
                   if self._clip_skip_setting is not None]))
            self._load_models()
            # Swapped first: an inference tensor's requires_grad cannot be set back outside inference mode.
            stack.enter_context(_plain_parameters(trees))
            stack.enter_context(frozen_parameters(trees))
            stack.enter_context(_norms_see_copies(self.unet))
            if gradient_checkpointing:
                stack.enter_context(temporary_attributes(
                    [(block, "forward", forward) for block, forward in self._checkpointed_blocks()]))
            yield

    def generate(self, prompt: str, negative_prompt: str, seed: int, steps: int, width: int, height: int,
                 guidance_scale: float) -> Image.Image:
        if self._generate_image is None:
            raise UserError("this backend has no image generator, so it cannot render sample images; "
                            "leave sample_prompts empty")
        return self._generate_image(prompt, negative_prompt, seed, steps, width, height, guidance_scale)

    def training_copy_bytes(self) -> int:
        return sum(parameter.numel() * parameter.element_size() for tree in self._graph_trees()
                   for parameter in tree.parameters() if _needs_plain_copy(parameter))

    def _graph_trees(self) -> list[nn.Module]:
        """The module trees autograd runs through (their weights are swapped for plain copies while training)."""
        return [self.unet, self._patchers.clip.cond_stage_model]

    def _checkpointed_blocks(self) -> list[tuple[nn.Module, Callable]]:
        """Each block recomputed in the backward pass under gradient checkpointing, with its checkpointed forward."""
        return [(block, partial(checkpointed_forward, partial(_on_a_copy, block.forward)))
                for block in self.unet.modules() if type(block).__name__ in CHECKPOINTED_BLOCKS]

    def _load_models(self) -> None:
        """Forge's memory manager: the LoRA-free UNet and text encoders on the device, whole.

        Loading the original patchers re-runs Forge's LoRA refresh with no LoRA, which puts back the weights
        a prompt's LoRA had replaced.
        """
        from backend import memory_management

        unet, clip = self._patchers.unet, self._patchers.clip.patcher
        for patcher in (unet, clip):
            loaded = [entry for entry in memory_management.current_loaded_models if entry.model is patcher]
            if not loaded:
                memory_management.unload_model_clones(patcher)
        memory_management.load_models_gpu([unet, clip])
        swapped = [entry for entry in memory_management.current_loaded_models
                   if entry.model in (unet, clip) and entry.model_accelerated]
        if swapped:
            raise UserError("Forge could not fit the whole model into GPU memory (it would stream weights from the "
                            "CPU in every step, which cannot train); close other programs or use a smaller model")

    def _embed_sizes(self, size_conditioning: torch.Tensor) -> torch.Tensor:
        """Forge's SDXL size vector: each of the six numbers as a 256-wide sinusoidal embedding, concatenated."""
        numbers = size_conditioning.to(self.device, torch.float32)
        return self.engine.embedder(numbers.flatten()).reshape(numbers.shape[0], SIZE_NUMBERS * SIZE_EMBEDDING_DIM)


def forge_backend(engine, generate_image: GenerateImage | None = None, model_name: str = "",
                  clip_skip: int | None = None) -> ForgeBackend:
    """The backend for Forge's loaded engine: `ForgeFluxBackend` for a Flux engine, `ForgeBackend` for SD1, SD2 and
    SDXL (the WebUI's Clip skip reaches only those)."""
    from backend.diffusion_engine.flux import Flux

    if isinstance(engine, Flux):
        from lora_trainer.models.forge_flux import ForgeFluxBackend

        return ForgeFluxBackend(engine, generate_image, model_name)
    return ForgeBackend(engine, generate_image, model_name, clip_skip)


def _family(engine) -> str:
    if getattr(engine, "is_sdxl", False):
        return "sdxl"
    if getattr(engine, "is_sd2", False):
        return "sd2"
    if getattr(engine, "is_sd1", False):
        return "sd1"
    raise UserError(f"the loaded model is a {type(engine).__name__}; the trainer trains SD1, SD2 and SDXL models "
                    "and Flux models in Forge (SD3 and Chroma are not supported yet)")


def _refuse_untrainable(engine, k_model: nn.Module, unet: nn.Module) -> None:
    """Raise a `UserError` that says what to do when the loaded model is one this backend cannot train."""
    refuse_quantized(k_model)
    if k_model.predictor.prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"the loaded model predicts {k_model.predictor.prediction_type!r}; only eps and v models "
                        "can be trained")
    if getattr(engine, "is_inpaint", False) or unet.in_channels != unet.out_channels:
        raise UserError("the loaded model is an inpainting or instruct model; load a plain text-to-image "
                        "checkpoint to train a LoRA")
    if getattr(engine, "is_sdxl", False) and not hasattr(engine, "text_processing_engine_l"):
        raise UserError("the loaded SDXL model has no CLIP-L text encoder (a refiner?); load an SDXL base model")


def refuse_quantized(k_model: nn.Module) -> None:
    """Raise a `UserError` naming the checkpoint type when the loaded model's weights are quantized.

    Training swaps each weight for a plain copy (`_plain_parameters`), which would drop the quantization state of
    bitsandbytes' nf4/fp4 parameters, and fp8 weights are not trained here either (gguf ones are: see
    `TRAINABLE_STORAGE_DTYPES`)."""
    storage = k_model.storage_dtype
    if storage in TRAINABLE_STORAGE_DTYPES:
        return
    kind = QUANTIZED_KINDS.get(storage, f"{storage}")
    raise UserError(f"the loaded model's weights are stored as {kind} (quantized), which cannot be trained; load a "
                    "16-bit (bf16/fp16) or GGUF checkpoint with Diffusion in Low Bits set to Automatic and start "
                    "again")


@contextmanager
def _norms_see_copies(unet: nn.Module) -> Iterator[None]:
    """Give each LayerNorm of Forge's transformer blocks a copy of its input.

    Those blocks add the attention and feed-forward outputs into their hidden states in place (`x += n`),
    after a LayerNorm has saved those states for its backward pass, which autograd then refuses."""
    norms = [child for block in unet.modules() if type(block).__name__ == "BasicTransformerBlock"
             for child in block.children() if isinstance(child, nn.LayerNorm)]
    handles = [norm.register_forward_pre_hook(_copied_inputs) for norm in norms]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _copied_inputs(module: nn.Module, inputs: tuple) -> tuple:
    return tuple(value.clone() if isinstance(value, torch.Tensor) else value for value in inputs)


def _on_a_copy(forward, hidden_states: torch.Tensor, *args, **kwargs):
    """`forward` on a copy of its hidden states: a checkpointed block must not change its saved input in place."""
    return forward(hidden_states.clone(), *args, **kwargs)


def _needs_plain_copy(parameter: nn.Parameter) -> bool:
    """Whether training swaps `parameter` for a plain copy: an inference-mode weight that is not gguf-quantized."""
    return parameter.is_inference() and getattr(parameter, "gguf_cls", None) is None


@contextmanager
def _plain_parameters(trees: list[nn.Module]) -> Iterator[None]:
    """Swap every inference-mode parameter of `trees` for a plain copy (autograd cannot save inference
    tensors for backward); afterwards put the very same original parameters back.

    Copies cost one more copy of those weights while training runs. A gguf-quantized weight stays: its layer
    dequantizes it into a fresh tensor in each forward. The copies are plain tensors (a gguf file's unquantized
    tensors are Forge's `ParameterGGUF`, whose attributes a clone would not carry)."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        with torch.inference_mode(False):
            for tree in trees:
                for module in tree.modules():
                    for name, parameter in list(module._parameters.items()):
                        if parameter is None or not _needs_plain_copy(parameter):
                            continue
                        swapped.append((module, name, parameter))
                        plain = parameter.as_subclass(torch.Tensor).clone()
                        module._parameters[name] = nn.Parameter(plain, requires_grad=False)
        yield
    finally:
        for module, name, parameter in reversed(swapped):
            module._parameters[name] = parameter
