"""What training a LoRA on the full-size Flux-dev (12B) in Forge would take: the bytes of its weights in each of
Forge's storage types and of the LoRA with its gradients and AdamW state, counted from Forge's own classes built on
the meta device from the config Forge's detection gives a Flux checkpoint (nothing is downloaded), and the bytes
autograd saves for one sample's backward pass, traced on the meta device with fused attention.

    LORA_TRAINER_FORGE_SOURCE=~/.cache/sd-webui-lora-trainer/forge-source python -m bench.flux_memory

Needs Forge's source (see tests/forge_models.py) and the 'forge' environment's packages.
"""

from __future__ import annotations

import types
from contextlib import ExitStack

import torch
from torch import nn

from lora_trainer.config import NetworkConfig
from lora_trainer.lora.network import LoraNetwork
from lora_trainer.lora.targets import find_lora_targets
from lora_trainer.models.forge_flux import ForgeFluxBackend
from lora_trainer.train.memory import GIB, lora_parameter_count
from tests.forge_models import import_forge
from tests.full_size import fused_attention, saved_bytes

FLUX_DEV = dict(in_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24,
                depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, qkv_bias=True,
                guidance_embed=True)
"""huggingface_guess's detection of a Flux-dev checkpoint (detection.py), as Forge's loader builds it."""
T5_XXL = dict(num_layers=24, d_model=4096, d_ff=10240, dense_act_fn="gelu_pytorch_tanh", is_gated_act=True,
              num_heads=64, model_type="t5", vocab_size=32128)
FLUX_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2,
                use_quant_conv=False, use_post_quant_conv=False)
LINEAR_WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "nf4": 0.5 + 4 / 64, "gguf Q8_0": 34 / 32, "gguf Q4_0": 18 / 32}
"""Bytes per linear-layer weight element in each storage: nf4 with an fp32 scale per 64 (Forge's own
quantization: blocksize 64, no double quantization), gguf's blocks of 32 with an fp16 scale."""
OTHER_BYTES = {"bf16": 2.0, "fp8": 1.0, "nf4": 2.0, "gguf Q8_0": 2.0, "gguf Q4_0": 2.0}
"""Bytes per element of everything else (biases, norms): Forge casts a whole fp8 model, keeps bnb's and gguf's
unquantized tensors in the computation dtype (bf16)."""
ADAMW_BYTES_PER_LORA_PARAMETER = 4 + 4 + 8
"""An fp32 LoRA weight, its gradient and AdamW's two moments."""


def main() -> None:
    import_forge()
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.t5 import IntegratedT5
    from backend.nn.vae import IntegratedAutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        transformer = IntegratedFluxTransformer2DModel(**FLUX_DEV).to(torch.bfloat16).requires_grad_(False)
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, projection_dim=768))
        t5 = IntegratedT5(T5_XXL)
        vae = IntegratedAutoencoderKL(**FLUX_VAE)
    linear = sum(module.weight.numel() for module in transformer.modules() if isinstance(module, nn.Linear))
    total = sum(parameter.numel() for parameter in transformer.parameters())
    print(f"Flux-dev transformer: {total:,} parameters, {linear:,} of them linear-layer weights")
    for storage in LINEAR_WEIGHT_BYTES:
        size = linear * LINEAR_WEIGHT_BYTES[storage] + (total - linear) * OTHER_BYTES[storage]
        print(f"  weights stored as {storage}: {size / GIB:.1f} GiB")
    for name, module in (("CLIP-L", clip_l), ("T5-XXL encoder", t5), ("VAE", vae)):
        count = sum(parameter.numel() for parameter in module.parameters())
        print(f"{name}: {count:,} parameters, {count * 2 / GIB:.2f} GiB in bf16" +
              (f", {count / GIB:.2f} GiB in fp8" if module is t5 else ""))
    stand_in = types.SimpleNamespace(lora_roots=lambda: ForgeFluxBackend.lora_roots(_engine_like(transformer))[:1])
    for rank in (16, 32, 64):
        count = lora_parameter_count(stand_in, NetworkConfig(lora_rank=rank))
        print(f"LoRA rank {rank} on kohya's Flux layers: {count:,} parameters, "
              f"{count * ADAMW_BYTES_PER_LORA_PARAMETER / GIB:.2f} GiB with gradients and AdamW")
    for side in (512, 1024):
        for checkpointing in (False, True):
            saved = _traced_saved_bytes(transformer, side, checkpointing)
            print(f"activations, one {side}x{side} sample, bf16, LoRA rank 16, gradient checkpointing "
                  f"{'on' if checkpointing else 'off'}: {saved / GIB:.1f} GiB")


def _engine_like(transformer: nn.Module) -> types.SimpleNamespace:
    """What `ForgeFluxBackend.lora_roots` reads, around a bare transformer (the CLIP root is dropped)."""
    clip = types.SimpleNamespace(cond_stage_model=types.SimpleNamespace(clip_l=types.SimpleNamespace(
        transformer=nn.Identity())))
    return types.SimpleNamespace(unet=transformer, _patchers=types.SimpleNamespace(clip=clip))


def _traced_saved_bytes(transformer: nn.Module, side: int, checkpointing: bool) -> int:
    """Bytes autograd saves for one sample at `side` px (T5's 256-token sequence, as Forge pads it), LoRA rank 16 on
    kohya's layers, Forge's attention as a fused kernel."""
    import backend.nn.flux as forge_flux
    from backend.attention import attention_pytorch

    from lora_trainer.models.webui_backend import temporary_attributes

    roots = ForgeFluxBackend.lora_roots(_engine_like(transformer))[:1]
    network = LoraNetwork(find_lora_targets(roots, NetworkConfig(lora_rank=16))).to("meta", torch.bfloat16)
    latent_side = side // 8
    latents = torch.empty(1, 16, latent_side, latent_side, device="meta", dtype=torch.bfloat16)
    context = torch.empty(1, 256, 4096, device="meta", dtype=torch.bfloat16)
    pooled = torch.empty(1, 768, device="meta", dtype=torch.bfloat16)
    timestep, guidance = (torch.ones(1, device="meta", dtype=torch.bfloat16) for _ in range(2))
    with ExitStack() as stack:
        stack.enter_context(fused_attention())
        stack.enter_context(temporary_attributes([(forge_flux, "attention_function", attention_pytorch)]))
        if checkpointing:
            backend = types.SimpleNamespace(unet=transformer)
            stack.enter_context(temporary_attributes(
                [(block, "forward", forward) for block, forward in ForgeFluxBackend._checkpointed_blocks(backend)]))
        stack.enter_context(network.applied(1.0))
        counted = stack.enter_context(saved_bytes(transformer))
        transformer(latents, timestep, context=context, y=pooled, guidance=guidance)
    return counted[0]


if __name__ == "__main__":
    main()
