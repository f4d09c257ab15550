"""CLIP tags: the shipped phrase lists, and ranking that keeps the most image-like phrases per category."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.caption.models import OpenClipBundle
from lora_trainer.caption.tags import CATEGORY_PICKS, ClipTagger, PhraseCategory, load_phrase_categories, top_phrases
from tests.caption_models import TINY_CLIP, register_tiny_configs, save_tiny_checkpoint, tiny_bundle

COLOUR_CATEGORIES = [
    PhraseCategory("subject", 2, ("a fire engine", "a tomato", "a frog", "the sea")),
    PhraseCategory("colour", 1, ("blue tones", "red tones", "green tones")),
]
# A direction in (red, green, blue) space per phrase: its similarity to an image is its cosine with the
# image's mean colour, so the test decides which phrases fit which image.
PHRASE_DIRECTIONS = {
    "a fire engine": (1.0, 0.1, 0.1),
    "a tomato": (1.0, 0.3, 0.0),
    "a frog": (0.2, 1.0, 0.1),
    "the sea": (0.0, 0.3, 1.0),
    "blue tones": (0.0, 0.0, 1.0),
    "red tones": (1.0, 0.0, 0.0),
    "green tones": (0.0, 1.0, 0.0),
}


class MeanColourClip(torch.nn.Module):
    """A stand-in CLIP: images embed as their mean colour, phrases as the directions above."""

    def __init__(self) -> None:
        super().__init__()
        self.phrases = list(PHRASE_DIRECTIONS)
        self.register_buffer("phrase_vectors", torch.tensor(list(PHRASE_DIRECTIONS.values())))

    def tokenize(self, phrases: list[str]) -> torch.Tensor:
        return torch.tensor([[self.phrases.index(phrase)] for phrase in phrases])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.phrase_vectors[tokens[:, 0]]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3))


def mean_colour_bundle() -> OpenClipBundle:
    model = MeanColourClip()
    return OpenClipBundle(
        model=model,
        preprocess=lambda image: torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1),
        tokenizer=model.tokenize,
        device=torch.device("cpu"),
    )


def test_every_category_ships_enough_distinct_phrases() -> None:
    categories = load_phrase_categories()
    assert [category.name for category in categories] == list(CATEGORY_PICKS)
    for category in categories:
        assert len(category.phrases) >= 3 * category.picks, category.name
        assert len(set(category.phrases)) == len(category.phrases), category.name
        assert not any(phrase.startswith("#") for phrase in category.phrases), category.name


def test_top_phrases_keeps_the_highest_scores_of_each_category_best_first() -> None:
    similarities = torch.tensor([0.1, 0.5, 0.3, 0.2, 0.05, 0.9, 0.4])
    assert top_phrases(similarities, COLOUR_CATEGORIES) == ["a tomato", "a frog", "red tones"]


@pytest.mark.parametrize(
    ("colour", "expected"),
    [
        ((230, 20, 10), "a fire engine, a tomato, red tones"),
        ((20, 200, 40), "a frog, the sea, green tones"),
        ((10, 60, 220), "the sea, a frog, blue tones"),
    ],
)
def test_tagger_writes_the_most_similar_phrases(colour: tuple[int, int, int], expected: str) -> None:
    tagger = ClipTagger(mean_colour_bundle(), COLOUR_CATEGORIES)
    assert tagger.caption([Image.new("RGB", (8, 8), colour)]) == [expected]


def test_tagger_captions_each_image_of_a_batch_on_its_own() -> None:
    tagger = ClipTagger(mean_colour_bundle(), COLOUR_CATEGORIES)
    images = [Image.new("RGB", (8, 8), colour) for colour in ((10, 60, 220), (230, 20, 10))]
    assert tagger.caption(images) == ["the sea, a frog, blue tones", "a fire engine, a tomato, red tones"]


def test_tagger_on_a_real_open_clip_model_picks_from_every_category(tmp_path: Path) -> None:
    register_tiny_configs(tmp_path)
    tagger = ClipTagger(tiny_bundle(TINY_CLIP, save_tiny_checkpoint(TINY_CLIP, tmp_path / "clip.pt")))
    [caption] = tagger.caption([Image.new("RGB", (48, 32), (200, 120, 40))])
    tags = caption.split(", ")
    expected_tags = [category for category in tagger.categories for _ in range(category.picks)]
    assert len(tags) == len(expected_tags)
    assert all(tag in category.phrases for tag, category in zip(tags, expected_tags, strict=True))
