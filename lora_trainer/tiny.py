"""Tiny Stable Diffusion models with random weights, built offline, for the demo and the tests.

They have the real architectures' structure (cross-attention UNet, KL VAE, CLIP text encoder(s), the
real CLIP tokenizer built from the BPE vocabulary that open_clip ships) at a size a CPU trains in
seconds. Real users point the trainer at their own checkpoints; the code paths are the same.
"""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import torch

from lora_trainer.files import atomic_write_text
from lora_trainer.models.webui_backend import SIZE_EMBEDDING_DIM

TINY_RESOLUTION = 32
CLIP_VOCAB_SIZE = 49408
TEXT_WIDTH = 32


def write_clip_tokenizer_files(folder: Path) -> Path:
    """Write `vocab.json` and `merges.txt` of the real CLIP BPE tokenizer into `folder`.

    The files are derived from open_clip's `bpe_simple_vocab_16e6.txt.gz` exactly as CLIP builds its
    vocabulary, so token ids match the published tokenizer.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    folder = Path(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_text(folder / "vocab.json", json.dumps({token: index for index, token in enumerate(vocab)}))
    return folder


def clip_tokenizer(folder: Path):
    """A transformers `CLIPTokenizer` with the real CLIP vocabulary, built offline in `folder`."""
    from transformers import CLIPTokenizer

    folder = write_clip_tokenizer_files(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


def open_clip_padded(tokenizer):
    """A copy of `tokenizer` that pads with token 0 ("!"), as OpenCLIP and the WebUI pad for the OpenCLIP
    encoders (SD2, SDXL's second): the padding is part of what the encoder's outputs, and so the UNet, see."""
    padded = copy.deepcopy(tokenizer)
    padded.pad_token = "!"
    return padded


def text_encoder_config(hidden_act: str = "quick_gelu", hidden_size: int = TEXT_WIDTH,
                         projection_dim: int = TEXT_WIDTH, layers: int = 2):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77, hidden_act=hidden_act,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=projection_dim)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=TINY_RESOLUTION)


def _scheduler(prediction_type: str):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1)


def tiny_sd_pipeline(family: str = "sd1", seed: int = 0, tokenizer_folder: Path | None = None):
    """A tiny random-weight diffusers pipeline of `family` ("sd1", "sd2" with v-prediction, or "sdxl")."""
    from diffusers import (
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(tokenizer_folder or Path.home() / ".cache" / "lora_trainer" / "clip-tokenizer")
    if family == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=SIZE_EMBEDDING_DIM, transformer_layers_per_block=1,
            projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * SIZE_EMBEDDING_DIM,
            cross_attention_dim=2 * TEXT_WIDTH)
        return StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=CLIPTextModel(text_encoder_config()),
            text_encoder_2=CLIPTextModelWithProjection(text_encoder_config(hidden_act="gelu")),
            tokenizer=tokenizer, tokenizer_2=open_clip_padded(tokenizer), unet=unet,
            scheduler=_scheduler("epsilon"))
    if family not in ("sd1", "sd2"):
        raise ValueError(f"unknown tiny model family {family!r}")
    is_sd2 = family == "sd2"
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=(2, 4), use_linear_projection=is_sd2)
    # SD2 reads the penultimate layer of its OpenCLIP encoder: converted to transformers, that encoder has one
    # layer fewer and its final norm applied, as the published SD2 text encoder in diffusers has.
    text_encoder = CLIPTextModel(text_encoder_config(hidden_act="gelu", layers=1) if is_sd2
                                 else text_encoder_config())
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=text_encoder, tokenizer=open_clip_padded(tokenizer) if is_sd2 else tokenizer,
        unet=unet,
        scheduler=_scheduler("v_prediction" if is_sd2 else "epsilon"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def save_tiny_model(folder: Path, family: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny model of `family` as a diffusers folder (what `base_model` points at)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        tiny_sd_pipeline(family, seed=seed, tokenizer_folder=folder / "tokenizer-source").save_pretrained(folder)
    return folder
