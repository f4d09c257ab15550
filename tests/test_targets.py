"""The layers a run adapts, checked against kohya sd-scripts' module counts on the full-size architectures
(built on the meta device: no weights, no downloads)."""

import pytest
import torch

pytest.importorskip("diffusers")
from full_size import meta_unet  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from lora_trainer.config import NetworkConfig  # noqa: E402
from lora_trainer.lora.naming import hf_clip_path  # noqa: E402
from lora_trainer.lora.targets import find_lora_targets  # noqa: E402
from lora_trainer.models.base import LoraRoot  # noqa: E402

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20)


def _roots(family: str, text_configs: list[dict], text_layers_used: list[int | None]) -> list[LoraRoot]:
    unet = meta_unet(family)
    with torch.device("meta"):
        encoders = [CLIPTextModel(CLIPTextConfig(**config)) for config in text_configs]
    prefixes = ["lora_te"] if len(encoders) == 1 else ["lora_te1", "lora_te2"]
    return [LoraRoot("lora_unet", "unet", unet, False, str, str)] + [
        LoraRoot(prefix, "text_encoder", encoder, True, hf_clip_path, hf_clip_path, text_layers_used=used)
        for prefix, encoder, used in zip(prefixes, encoders, text_layers_used)]


@pytest.fixture(scope="module")
def sd15_roots() -> list[LoraRoot]:
    return _roots("sd1", [CLIP_L], [None])


def _counts(roots: list[LoraRoot], **network) -> dict[str, int]:
    targets = find_lora_targets(roots, NetworkConfig(train_text_encoder=True, **network))
    return {prefix: sum(target.key.startswith(prefix + "_") for target in targets)
            for prefix in ("lora_unet", "lora_te", "lora_te1", "lora_te2")}


def test_the_default_layers_are_kohyas_for_sd15(sd15_roots):
    counts = _counts(sd15_roots)
    # kohya: "create LoRA for Text Encoder: 72 modules", "create LoRA for U-Net: 192 modules".
    assert (counts["lora_unet"], counts["lora_te"]) == (192, 72)


def test_attention_only_is_one_key_away(sd15_roots):
    counts = _counts(sd15_roots, target_modules=["attention"],
                     text_encoder_target_modules=["attention"])
    assert (counts["lora_unet"], counts["lora_te"]) == (128, 48)


def test_a_conv_rank_covers_what_kohyas_locon_covers(sd15_roots):
    # kohya with conv_dim: "create LoRA for U-Net: 278 modules" (the transformer blocks' 192, plus every
    # resnet's conv1, conv2, time_emb_proj and conv_shortcut and the samplers' convolutions).
    assert _counts(sd15_roots, conv_rank=4)["lora_unet"] == 278


def test_the_default_layers_are_kohyas_for_sdxl_without_the_layer_it_never_runs():
    counts = _counts(_roots("sdxl", [CLIP_L, CLIP_BIG_G], [11, None]))
    # kohya: 722 U-Net modules and 72 + 192 for the text encoders, of which CLIP-L's last layer (6) never runs:
    # SDXL conditions on its penultimate layer.
    assert (counts["lora_unet"], counts["lora_te1"], counts["lora_te2"]) == (722, 66, 192)
