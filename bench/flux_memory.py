"""What training a LoRA on the full-size Flux-dev (12B) in Forge would take: the bytes of its weights in each of
Forge's storage types and of the LoRA with its gradients and AdamW state, counted from Forge's own classes built on
the meta device from the config Forge's detection gives a Flux checkpoint (nothing is downloaded), and the bytes
autograd saves for one sample's backward pass, traced on the meta device with fused attention.

    LORA_TRAINER_FORGE_SOURCE=~/.cache/sd-webui-lora-trainer/forge-source python -m bench.flux_memory

Needs Forge's source (see tests/forge_models.py) and the 'forge' environment's packages.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from lora_trainer.config import NetworkConfig
from lora_trainer.models.layout import TransformerLayout
from lora_trainer.train.memory import GIB, lora_parameter_count, transformer_activation_elements
from tests.forge_models import import_forge
from tests.full_size import FLUX_DEV, flux_lora_root, flux_saved_bytes, meta_flux

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
    from backend.nn.t5 import IntegratedT5
    from backend.nn.vae import IntegratedAutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    transformer = meta_flux()
    with torch.device("meta"):
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
    stand_in = types.SimpleNamespace(lora_roots=lambda: [flux_lora_root(transformer)])
    for rank in (16, 32, 64):
        count = lora_parameter_count(stand_in, NetworkConfig(lora_rank=rank))
        print(f"LoRA rank {rank} on kohya's Flux layers: {count:,} parameters, "
              f"{count * ADAMW_BYTES_PER_LORA_PARAMETER / GIB:.2f} GiB with gradients and AdamW")
    layout = TransformerLayout(FLUX_DEV["hidden_size"], FLUX_DEV["depth"], FLUX_DEV["depth_single_blocks"], 256, 2)
    for side in (512, 1024):
        for checkpointing in (False, True):
            saved = flux_saved_bytes(transformer, side, checkpointing)
            counted = transformer_activation_elements(layout, side // 8, side // 8, checkpointing).peak * 2
            print(f"activations, one {side}x{side} sample, bf16, LoRA rank 16, gradient checkpointing "
                  f"{'on' if checkpointing else 'off'}: traced {saved / GIB:.1f} GiB (kept), the memory plan "
                  f"counts {counted / GIB:.1f} (with the recomputed block)")


if __name__ == "__main__":
    main()
