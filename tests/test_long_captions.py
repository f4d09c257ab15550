"""Captions longer than the text encoder's 75-token window, encoded as the WebUI does, with the text-encoder cache.

The WebUI encodes a long prompt as several 77-token chunks side by side and pads the prompts of a batch that
need fewer chunks with empty chunks. The tiny test models' encoders truncate at 77 tokens like ldm's and
diffusers' own, so `ChunkingBackend` adds the WebUI's rule around either tiny model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import write_shapes_dataset
from PIL import Image

from lora_trainer.config import TrainConfig, config_from_dict
from lora_trainer.models.base import DiffusionBackend, LoraRoot, ModelParts, TextConditioning
from lora_trainer.models.layout import UNetLayout
from lora_trainer.train.loop import train

LONG_CAPTION = "zz, " + ", ".join(["a very detailed red square shape"] * 16)
"""About 110 tokens: two chunks. It sorts after the short captions, into the last group the cache encodes."""


class ChunkingBackend(DiffusionBackend):
    """`inner` with the WebUI's long-prompt rule (modules/sd_hijack_clip.py, `TextConditionalModel.forward`):
    75 tokens per chunk between BOS and EOS padding, each chunk encoded on its own, the chunks concatenated,
    and captions with fewer chunks padded with empty chunks. Records the contexts `predict` is given."""

    def __init__(self, inner: DiffusionBackend, tokenizer, encode_tokens: Callable[[torch.Tensor], torch.Tensor]):
        self.inner, self.tokenizer, self.encode_tokens = inner, tokenizer, encode_tokens
        self.family, self.prediction_type, self.device = inner.family, inner.prediction_type, inner.device
        self.weight_dtype, self.model_name, self.latent_scale = inner.weight_dtype, inner.model_name, inner.latent_scale
        self.contexts: list[torch.Tensor] = []

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.inner.alphas_cumprod

    def lora_roots(self) -> list[LoraRoot]:
        return self.inner.lora_roots()

    def model_parts(self) -> ModelParts:
        return self.inner.model_parts()

    def unet_layout(self) -> UNetLayout:
        return self.inner.unet_layout()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_images(pixels)

    def vae_fingerprint(self) -> str:
        return self.inner.vae_fingerprint()

    def text_encoder_fingerprint(self) -> str:
        return self.inner.text_encoder_fingerprint() + "|chunks of 75 tokens"

    def encode_text(self, captions: list[str]) -> TextConditioning:
        tokens = [self.tokenizer(caption, add_special_tokens=False).input_ids for caption in captions]
        chunks = [[ids[start:start + 75] for start in range(0, len(ids), 75)] or [[]] for ids in tokens]
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        contexts = []
        for index in range(max(len(caption_chunks) for caption_chunks in chunks)):
            pieces = [caption_chunks[index] if index < len(caption_chunks) else [] for caption_chunks in chunks]
            ids = torch.tensor([[bos] + piece + [eos] * (76 - len(piece)) for piece in pieces], device=self.device)
            contexts.append(self.encode_tokens(ids))
        return TextConditioning(torch.cat(contexts, dim=1))

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
                size_conditioning: torch.Tensor) -> torch.Tensor:
        self.contexts.append(text.context.detach().clone())
        return self.inner.predict(noisy_latents, timesteps, text, size_conditioning)

    @contextmanager
    def training_mode(self, gradient_checkpointing: bool) -> Iterator[None]:
        with self.inner.training_mode(gradient_checkpointing):
            yield

    def generate(self, prompt: str, negative_prompt: str, seed: int, steps: int, width: int, height: int,
                 guidance_scale: float) -> Image.Image:
        return self.inner.generate(prompt, negative_prompt, seed, steps, width, height, guidance_scale)


@pytest.fixture(scope="module", params=["webui", "diffusers"])
def backend(request, tmp_path_factory) -> ChunkingBackend:
    """A chunking backend around the tiny SD1 model of the WebUI (ldm) or of diffusers, where installed."""
    folder = tmp_path_factory.mktemp("models")
    if request.param == "webui":
        pytest.importorskip("ldm")
        from lora_trainer.models.webui_backend import WebUIBackend
        from tests.ldm_models import tiny_sd1

        model = tiny_sd1(folder)
        encoder = model.cond_stage_model.wrapped
        return ChunkingBackend(WebUIBackend(model), encoder.tokenizer,
                               lambda ids: encoder.transformer(input_ids=ids).last_hidden_state)
    pytest.importorskip("diffusers")
    from lora_trainer.models.diffusers_backend import DiffusersBackend
    from lora_trainer.tiny import tiny_sd_pipeline

    pipeline = tiny_sd_pipeline("sd1", seed=0, tokenizer_folder=folder)
    return ChunkingBackend(DiffusersBackend(pipeline, "cpu"), pipeline.tokenizer,
                           lambda ids: pipeline.text_encoder(ids)[0])


@pytest.fixture
def mixed_dataset(tmp_path) -> Path:
    """20 images: 19 distinct short captions and one of two chunks, more than one 16-caption cache group."""
    folder = write_shapes_dataset(tmp_path / "dataset", count=20)
    for index, caption_file in enumerate(sorted(folder.glob("*.txt"))):
        caption_file.write_text(LONG_CAPTION if index == 19 else f"sks, shape number {index}")
    return folder


def _config(dataset: Path, output_dir: Path, **overrides) -> TrainConfig:
    # One batch of all 20 images: every step mixes the long caption with short ones from both cache groups.
    settings = dict(train_data_dir=dataset, resolution=32, bucket_step=8, lora_rank=4, batch_size=20,
                    max_train_steps=2, output_dir=output_dir, logging_dir=None, cache_text_encoder_outputs=True)
    settings.update(overrides)
    return config_from_dict(settings)


def test_the_long_caption_is_encoded_as_two_chunks(backend):
    assert backend.encode_text([LONG_CAPTION, "sks"]).context.shape[1] == 2 * 77


def test_training_with_cached_long_and_short_captions_runs_to_the_end(backend, mixed_dataset, tmp_path):
    result = train(_config(mixed_dataset, tmp_path / "out"), backend)
    assert result.steps == 2 and not result.stopped


def test_batches_stacked_from_the_cache_equal_the_batches_encoded_at_once(backend, mixed_dataset, tmp_path):
    # One epoch of five batches of four: the long caption's batch, and batches of short captions only.
    backend.contexts.clear()
    train(_config(mixed_dataset, tmp_path / "cached", batch_size=4, max_train_steps=5), backend)
    cached = list(backend.contexts)
    backend.contexts.clear()
    train(_config(mixed_dataset, tmp_path / "encoded", batch_size=4, max_train_steps=5,
                  cache_text_encoder_outputs=False), backend)
    encoded = list(backend.contexts)
    assert sorted(context.shape[1] for context in encoded) == [77, 77, 77, 77, 2 * 77]
    for from_cache, at_once in zip(cached, encoded, strict=True):
        assert from_cache.shape == at_once.shape
        assert torch.allclose(from_cache, at_once, atol=1e-6)


def test_a_difference_of_no_whole_number_of_padding_chunks_is_filled_with_the_end_of_the_padding():
    """Flux's T5 gives a caption of more than 255 tokens a context of its own length."""
    padding = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 2)
    short, odd = TextConditioning(torch.full((1, 4, 2), -1.0)), TextConditioning(torch.full((1, 10, 2), 7.0))
    stacked = TextConditioning.stack([short, odd], padding=padding)
    assert stacked.context.shape == (2, 10, 2)
    assert stacked.context[0, :4].eq(-1.0).all() and stacked.context[1].eq(7.0).all()
    assert stacked.context[0, 4:, 0].tolist() == [2.0, 3.0, 0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="without padding"):
        TextConditioning.stack([short, odd])


def test_stacking_pads_shorter_contexts_with_copies_of_the_padding_chunk():
    short, long = TextConditioning(torch.zeros(1, 2, 3)), TextConditioning(torch.ones(1, 6, 3))
    stacked = TextConditioning.stack([short, long], padding=torch.full((1, 2, 3), 5.0))
    assert stacked.context.shape == (2, 6, 3)
    assert stacked.context[0, 2:].eq(5.0).all() and stacked.context[1].eq(1.0).all()
