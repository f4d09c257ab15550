"""Write a diffusers SD1 pipeline as an original-layout single-file checkpoint (what users download).

Test-only: it lets the tests load a real `.safetensors` single file through `from_single_file` offline.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from lora_trainer.models.original_checkpoint import clip_to_transformers_original, unet_to_original, vae_to_original


def save_original_checkpoint(pipeline, path: Path) -> Path:
    """Save `pipeline`'s UNet, VAE and text encoder under the original (ldm) key names."""
    state = {f"model.diffusion_model.{key}": tensor
             for key, tensor in unet_to_original(pipeline.unet.state_dict()).items()}
    state |= {f"first_stage_model.{key}": tensor for key, tensor in vae_to_original(pipeline.vae.state_dict()).items()}
    state |= {f"cond_stage_model.transformer.{key}": tensor
              for key, tensor in clip_to_transformers_original(pipeline.text_encoder.state_dict()).items()}
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path
