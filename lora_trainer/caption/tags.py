"""CLIP tags: rank short phrases per category by image-text similarity and keep the best of each.

The approach of the CLIP interrogator, without its BLIP caption: a caption such as "a portrait of a
woman, oil painting, impressionism, soft window light, warm colours, close-up". The phrase lists are
plain text files in `phrases/`, one phrase per line.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F
from PIL import Image

from lora_trainer.caption.models import OpenClipBundle, inference_precision

_TEXT_BATCH_SIZE = 256


@dataclass(frozen=True)
class PhraseCategory:
    """One kind of tag (subject, medium, ...) and how many of its phrases a caption gets."""

    name: str
    picks: int
    phrases: tuple[str, ...]


# Caption order: what is shown first, then how it is made, then how it looks.
CATEGORY_PICKS = {"subject": 2, "medium": 1, "style": 2, "lighting": 1, "colour": 1, "composition": 1}


def load_phrase_categories() -> list[PhraseCategory]:
    """The phrase lists shipped in `lora_trainer/caption/phrases/`, in caption order."""
    phrase_folder = resources.files("lora_trainer.caption").joinpath("phrases")
    categories = []
    for name, picks in CATEGORY_PICKS.items():
        lines = phrase_folder.joinpath(f"{name}.txt").read_text(encoding="utf-8").splitlines()
        phrases = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
        categories.append(PhraseCategory(name=name, picks=picks, phrases=phrases))
    return categories


def top_phrases(similarities: torch.Tensor, categories: list[PhraseCategory]) -> list[str]:
    """The `picks` most similar phrases of each category, best first within it, categories in order.

    `similarities` holds one score per phrase, in the order of the categories' phrases laid end to end.
    """
    chosen: list[str] = []
    start = 0
    for category in categories:
        scores = similarities[start : start + len(category.phrases)]
        best = scores.topk(min(category.picks, len(category.phrases))).indices.tolist()
        chosen.extend(category.phrases[index] for index in best)
        start += len(category.phrases)
    return chosen


class ClipTagger:
    """Comma-separated tags per image from a CLIP model."""

    def __init__(self, bundle: OpenClipBundle, categories: list[PhraseCategory] | None = None) -> None:
        self.bundle = bundle
        self.categories = load_phrase_categories() if categories is None else categories
        phrases = [phrase for category in self.categories for phrase in category.phrases]
        with inference_precision(bundle.device):
            features = [
                bundle.model.encode_text(bundle.tokenizer(phrases[start : start + _TEXT_BATCH_SIZE]).to(bundle.device))
                for start in range(0, len(phrases), _TEXT_BATCH_SIZE)
            ]
        self.phrase_features = F.normalize(torch.cat(features).float(), dim=-1)

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in order: the chosen phrases joined by commas."""
        pixels = torch.stack([self.bundle.preprocess(image) for image in images]).to(self.bundle.device)
        with inference_precision(self.bundle.device):
            image_features = self.bundle.model.encode_image(pixels)
        similarities = F.normalize(image_features.float(), dim=-1) @ self.phrase_features.T
        return [", ".join(top_phrases(image_similarities, self.categories)) for image_similarities in similarities]
