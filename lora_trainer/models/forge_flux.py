"""Forge's loaded Flux engine (`backend.diffusion_engine.flux.Flux`) as a training backend: flow matching on
Forge's own transformer, with its CLIP-L (pooled vector) and T5 (sequence) text engines and its 16-channel VAE.

The run, its weight swaps and Forge's LoRA undo are those of the SD engines (`ForgeBackend`); what differs is
the model's input: Flux predicts the velocity `noise - latents` from `(1 - sigma) latents + sigma noise`, takes
sigma itself as its timestep, and Flux-dev also a guidance strength. Kohya's names for Flux are the module paths
of this transformer (`lora_unet_double_blocks_0_img_attn_qkv`), as Forge's LoRA key map reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from lora_trainer.lora.naming import UNET_PREFIX, hf_clip_path
from lora_trainer.models.base import LoraRoot, TextConditioning
from lora_trainer.models.forge_backend import ForgeBackend, refuse_quantized
from lora_trainer.models.layout import TransformerLayout
from lora_trainer.models.webui_backend import GenerateImage, checkpointed_forward

TRAINING_GUIDANCE = 1.0
"""The guidance strength Flux-dev's guidance embedding is given while training: kohya's recommendation (its
`--guidance_scale 1.0`), which leaves the distilled guidance neutral for the LoRA, so that it learns the images
and not a guidance level; generation then uses Forge's Distilled CFG Scale (3.5) as usual."""
PATCH_SIZE = 2
"""Flux packs each 2x2 latent patch into one token."""
FLUX_BLOCKS = frozenset({"DoubleStreamBlock", "SingleStreamBlock"})
"""The transformer's blocks, each recomputed in the backward pass under gradient checkpointing."""


class ForgeFluxBackend(ForgeBackend):
    """Forge's loaded Flux-dev or Flux-schnell engine as a training backend (see the module docstring).

    Forge's Clip skip does not reach Flux's conditioning (CLIP-L gives only its pooled output), so it is left
    alone; T5 is never trained (kohya's default), so it runs without a graph and its weights are not copied.
    """

    diffusers_names = False

    def __init__(self, engine, generate_image: GenerateImage | None = None, model_name: str = ""):
        self.engine = engine
        self.family = "flux"
        self.prediction_type = "flow"
        self._patchers = engine.forge_objects_original
        k_model = self._patchers.unet.model
        self.unet: nn.Module = k_model.diffusion_model
        refuse_quantized(k_model)
        self.flow_shift = float(k_model.predictor.mu)
        self.flux_variant = "dev" if self.unet.guidance_embed else "schnell"
        self.device = torch.device(self._patchers.unet.load_device)
        self.weight_dtype = k_model.computation_dtype
        checkpoint_info = getattr(engine, "sd_checkpoint_info", None)
        self.model_name = getattr(checkpoint_info, "model_name", None) or model_name or type(engine).__name__
        self.latent_scale = self._patchers.vae.downscale_ratio * PATCH_SIZE
        self._text_engines = [engine.text_processing_engine_l]
        self._clip_skip_setting = None
        self.clip_skip = None
        self._generate_image = generate_image

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        raise TypeError("a flow-matching model has no alphas_cumprod: its noise level is sigma itself")

    def lora_roots(self) -> list[LoraRoot]:
        clip_l = self._patchers.clip.cond_stage_model.clip_l.transformer
        return [LoraRoot(UNET_PREFIX, "transformer", self.unet, is_text_encoder=False, kohya_path=str, peft_path=str),
                LoraRoot("lora_te1", "text_encoder", clip_l, is_text_encoder=True, kohya_path=hf_clip_path,
                         peft_path=hf_clip_path)]

    def unet_layout(self) -> TransformerLayout:
        return TransformerLayout(self.unet.hidden_size, len(self.unet.double_blocks), len(self.unet.single_blocks),
                                 self.engine.text_processing_engine_t5.min_length, PATCH_SIZE)

    def encode_text(self, captions: list[str]) -> TextConditioning:
        _, pooled = self.engine.text_processing_engine_l(captions)
        # Forge's T5 engine gives each prompt max(256, its tokens + 1) positions and stacks them, which fails for a
        # batch with a caption over 255 tokens: each caption is encoded alone, at the length Forge gives it, and the
        # shorter ones padded as a cached batch is (`TextConditioning.stack`).
        with torch.no_grad():
            sequences = [TextConditioning(self.engine.text_processing_engine_t5([caption]).clone())
                         for caption in captions]
            lengths = {sequence.context.shape[1] for sequence in sequences}
            padding = self.engine.text_processing_engine_t5([""]).clone() if len(lengths) > 1 else None
        return TextConditioning(TextConditioning.stack(sequences, padding).context, pooled.clone())

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
                size_conditioning: torch.Tensor) -> torch.Tensor:
        rows = noisy_latents.shape[0]
        guidance = None
        if self.unet.guidance_embed:
            guidance = torch.full((rows,), TRAINING_GUIDANCE, device=self.device, dtype=self.weight_dtype)
        return self.unet(noisy_latents.to(self.device, self.weight_dtype), timesteps.to(self.device).float(),
                         context=text.context.to(self.device, self.weight_dtype),
                         y=text.pooled.to(self.device, self.weight_dtype), guidance=guidance)

    def _graph_trees(self) -> list[nn.Module]:
        # T5 (8.9 GiB in bf16 at full size) runs without a graph, where its inference-mode weights serve as they are.
        return [self.unet, self._patchers.clip.cond_stage_model.clip_l]

    def _checkpointed_blocks(self) -> list[tuple[nn.Module, Callable]]:
        # Flux's blocks add into fresh tensors (`img = img + ...`): their inputs need no copy.
        return [(block, partial(checkpointed_forward, block.forward)) for block in self.unet.modules()
                if type(block).__name__ in FLUX_BLOCKS]

