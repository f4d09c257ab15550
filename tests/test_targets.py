"""The layers a run adapts, checked against kohya sd-scripts' module counts on the full-size architectures
(built on the meta device: no weights, no downloads)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from lora_trainer.config import NetworkConfig  # noqa: E402
from lora_trainer.lora.naming import hf_clip_path  # noqa: E402
from lora_trainer.lora.targets import find_lora_targets  # noqa: E402
from lora_trainer.models.base import LoraRoot  # noqa: E402

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20)


def _roots(unet_config: dict, text_configs: list[dict], text_layers_used: list[int | None]) -> list[LoraRoot]:
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_config)
        encoders = [CLIPTextModel(CLIPTextConfig(**config)) for config in text_configs]
    prefixes = ["lora_te"] if len(encoders) == 1 else ["lora_te1", "lora_te2"]
    return [LoraRoot("lora_unet", "unet", unet, False, str, str)] + [
        LoraRoot(prefix, "text_encoder", encoder, True, hf_clip_path, hf_clip_path, text_layers_used=used)
        for prefix, encoder, used in zip(prefixes, encoders, text_layers_used)]


@pytest.fixture(scope="module")
def sd15_roots() -> list[LoraRoot]:
    return _roots(SD15_UNET, [CLIP_L], [None])


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
    counts = _counts(_roots(SDXL_UNET, [CLIP_L, CLIP_BIG_G], [11, None]))
    # kohya: 722 U-Net modules and 72 + 192 for the text encoders, of which CLIP-L's last layer (6) never runs:
    # SDXL conditions on its penultimate layer.
    assert (counts["lora_unet"], counts["lora_te1"], counts["lora_te2"]) == (722, 66, 192)
