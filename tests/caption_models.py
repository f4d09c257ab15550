"""Tiny open_clip CoCa and CLIP models with random weights, built offline for the caption tests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import open_clip
import torch

from lora_trainer.caption.models import OpenClipBundle, load_open_clip

TINY_COCA = "lt-test-tiny-coca"
TINY_CLIP = "lt-test-tiny-clip"
TINY_IMAGE_SIZE = 32
TINY_CONTEXT_LENGTH = 12


def _tiny_configs() -> dict[str, dict]:
    vision_fields = {field.name for field in dataclasses.fields(open_clip.CLIPVisionCfg)}
    # open_clip 3.x renamed the attentional pooler's query count.
    queries_key = "attn_pooler_queries" if "attn_pooler_queries" in vision_fields else "n_queries"
    vision = dict(image_size=TINY_IMAGE_SIZE, layers=1, width=32, head_width=16, patch_size=16)
    text = dict(context_length=TINY_CONTEXT_LENGTH, vocab_size=49408, width=32, heads=2, layers=2)
    pooled_vision = {**vision, "attentional_pool": True, "attn_pooler_heads": 2, queries_key: 5, "output_tokens": True}
    coca = {
        "embed_dim": 32,
        "vision_cfg": pooled_vision,
        "text_cfg": {**text, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {**text, "attn_pooler_heads": 2},
        "custom_text": True,
    }
    clip = {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}
    return {TINY_COCA: coca, TINY_CLIP: clip}


def register_tiny_configs(folder: Path) -> None:
    """Make the tiny architectures known to open_clip by name, as a built-in config would be."""
    for name, config in _tiny_configs().items():
        (folder / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder / f"{name}.json")


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny registered model with random weights from `seed`, in eval mode."""
    torch.manual_seed(seed)
    model = open_clip.create_model(name).eval()
    if isinstance(model, open_clip.CoCa):
        # open_clip leaves the decoder's output projection uninitialised (real weights overwrite it).
        decoder = model.text_decoder
        torch.nn.init.normal_(decoder.text_projection, std=decoder.width**-0.5)
    return model


def save_tiny_checkpoint(name: str, path: Path, seed: int = 0) -> Path:
    """A weights file for the tiny architecture `name`, as users pass one with --pretrained."""
    torch.save(tiny_model(name, seed).state_dict(), path)
    return path


def tiny_bundle(name: str, checkpoint: Path) -> OpenClipBundle:
    """The tiny model loaded the way real weights are, on the CPU."""
    return load_open_clip(name, str(checkpoint), torch.device("cpu"))
