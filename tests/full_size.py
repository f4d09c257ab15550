"""The full-size SD1.5, SD2.1 and SDXL architectures and Forge's Flux-dev on the meta device (no weights, nothing
downloaded), their published parameter counts, and a trace of the bytes autograd saves for the backward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
import torch.nn.functional as F

UNET_CONFIGS = {
    "sd1": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=64),
    "sd2": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=1024,
                attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, upcast_attention=True,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=96),
    "sdxl": dict(block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128),
}
PUBLISHED_UNET_PARAMETERS = {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}
"""The parameter counts of the released UNets (SD1.5, SD2.1, SDXL base 1.0)."""
VAE_CONFIG = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
PUBLISHED_VAE_PARAMETERS = 83_653_863


@cache
def meta_unet(family: str):
    """The full-size UNet of `family` on the meta device (one per family: leave it as you found it)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(in_channels=4, out_channels=4, **UNET_CONFIGS[family])


def meta_vae():
    """The SD VAE on the meta device."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(**VAE_CONFIG)


class _FusedAttention(torch.autograd.Function):
    """What a fused (flash / memory-efficient) attention kernel keeps for backward: q, k, v, the output and the
    log-sum-exp per query; the meta device would otherwise run the math path, which keeps the whole matrix."""

    @staticmethod
    def forward(ctx, query, key, value):
        output = torch.empty_like(query)
        ctx.save_for_backward(query, key, value, output, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return output

    @staticmethod
    def backward(ctx, gradient):
        raise NotImplementedError("a meta-device trace has no backward pass")


def _fused_attention(query, key, value, *args, **kwargs):
    return _FusedAttention.apply(query, key, value)


@contextmanager
def fused_attention() -> Iterator[None]:
    """Run `F.scaled_dot_product_attention` as a fused kernel keeps memory, for a meta-device trace."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextmanager
def saved_bytes(*models: torch.nn.Module) -> Iterator[list[int]]:
    """Count the bytes of every distinct storage autograd saves for backward inside the block, except the
    parameters and buffers of `models` (one number in the yielded list, filled in at the end)."""
    weights = {tensor.untyped_storage()._cdata for model in models
               for tensor in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            storages[storage._cdata] = storage.nbytes()
        return tensor

    counted: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield counted
    counted.append(sum(storages.values()))


FLUX_DEV = dict(in_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24,
                depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, qkv_bias=True,
                guidance_embed=True)
"""huggingface_guess's detection of a Flux-dev checkpoint (detection.py), as Forge's loader builds it."""


def meta_flux(double_blocks: int = 19, single_blocks: int = 38):
    """Forge's Flux-dev transformer in bf16 on the meta device, frozen, with fewer blocks when asked (Forge's
    source must be importable: `tests.forge_models.import_forge`)."""
    from backend.nn.flux import IntegratedFluxTransformer2DModel

    with torch.device("meta"):
        transformer = IntegratedFluxTransformer2DModel(**(FLUX_DEV | dict(depth=double_blocks,
                                                                          depth_single_blocks=single_blocks)))
    return transformer.to(torch.bfloat16).requires_grad_(False)


def flux_lora_root(transformer: torch.nn.Module):
    """A Flux transformer as the LoRA root `ForgeFluxBackend` gives it."""
    from lora_trainer.lora.naming import UNET_PREFIX
    from lora_trainer.models.base import LoraRoot

    return LoraRoot(UNET_PREFIX, "transformer", transformer, is_text_encoder=False, kohya_path=str, peft_path=str)


def flux_saved_bytes(transformer: torch.nn.Module, side: int, checkpointing: bool, text_tokens: int = 256) -> int:
    """Bytes autograd saves for one bf16 sample of `side` px through a meta-device Flux transformer with LoRA rank
    16 on kohya's layers (T5's sequence of `text_tokens`), Forge's attention run as a fused kernel; with
    `checkpointing`, the blocks checkpointed as `ForgeFluxBackend` does it (what they keep, not a recompute)."""
    import types
    from contextlib import ExitStack

    import backend.nn.flux as forge_flux
    from backend.attention import attention_pytorch

    from lora_trainer.config import NetworkConfig
    from lora_trainer.lora.network import LoraNetwork
    from lora_trainer.lora.targets import find_lora_targets
    from lora_trainer.models.forge_flux import ForgeFluxBackend
    from lora_trainer.models.webui_backend import temporary_attributes

    targets = find_lora_targets([flux_lora_root(transformer)], NetworkConfig(lora_rank=16))
    network = LoraNetwork(targets).to("meta", torch.bfloat16)
    latent_side = side // 8

    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

    with ExitStack() as stack:
        stack.enter_context(fused_attention())
        stack.enter_context(temporary_attributes([(forge_flux, "attention_function", attention_pytorch)]))
        if checkpointing:
            blocks = ForgeFluxBackend._checkpointed_blocks(types.SimpleNamespace(unet=transformer))
            stack.enter_context(temporary_attributes([(block, "forward", forward) for block, forward in blocks]))
        stack.enter_context(network.applied(1.0))
        counted = stack.enter_context(saved_bytes(transformer))
        transformer(meta(1, 16, latent_side, latent_side), meta(1), context=meta(1, text_tokens, 4096),
                    y=meta(1, 768), guidance=meta(1))
    return counted[0]
