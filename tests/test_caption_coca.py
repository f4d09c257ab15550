"""CoCa decoding: the cached, batched decoder picks exactly the tokens a naive full-prefix decode picks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_trainer.caption.coca import (
    CocaCaptioner,
    CocaDecoding,
    SpecialTokens,
    clip_special_tokens,
    decode_tokens,
    filter_top_k_top_p,
    tokens_to_text,
)
from lora_trainer.errors import UserError
from tests.caption_models import (
    TINY_CLIP,
    TINY_COCA,
    register_tiny_configs,
    save_tiny_checkpoint,
    tiny_bundle,
    tiny_model,
)

MAX_TOKENS = 10
IMAGE_COUNT = 6


@pytest.fixture(scope="module", autouse=True)
def tiny_configs(tmp_path_factory: pytest.TempPathFactory) -> None:
    register_tiny_configs(tmp_path_factory.mktemp("configs"))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A tiny CoCa in float64 (so cached and uncached sums agree to the last bit that matters) whose
    end-of-text score is boosted, so that captions end at different steps within one batch."""
    coca = tiny_model(TINY_COCA, seed=1).double()
    with torch.no_grad():
        coca.text_decoder.text_projection[:, special_tokens(coca).end] *= 5.0
    return coca


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(IMAGE_COUNT, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def special_tokens(model: torch.nn.Module) -> SpecialTokens:
    return clip_special_tokens(pad=model.pad_id)


def reference_next_scores(
    model: torch.nn.Module, image: torch.Tensor, generated: list[int], decoding: CocaDecoding
) -> torch.Tensor:
    """Next-token scores the slow, obvious way: one image, the whole prefix through the model's towers."""
    special = special_tokens(model)
    _, image_embs = model.visual(image[None])
    _, token_embs = model.text(torch.tensor([[special.start, *generated]]))
    scores = model.text_decoder(image_embs, token_embs)[0, -1].clone()
    scores[special.start] = scores[special.pad] = float("-inf")
    if len(generated) < decoding.min_tokens:
        scores[special.end] = float("-inf")
    for token in set(generated):
        score = scores[token]
        scores[token] = score / decoding.repetition_penalty if score > 0 else score * decoding.repetition_penalty
    return scores


def reference_greedy(model: torch.nn.Module, image: torch.Tensor, decoding: CocaDecoding) -> list[int]:
    generated: list[int] = []
    while len(generated) < decoding.max_tokens:
        token = int(reference_next_scores(model, image, generated, decoding).argmax())
        if token == special_tokens(model).end:
            break
        generated.append(token)
    return generated


def reference_beam_search(model: torch.nn.Module, image: torch.Tensor, decoding: CocaDecoding) -> list[int]:
    """Textbook beam search over Python lists, one image, no cache: stop once num_beams captions ended."""
    beam_count, end = decoding.num_beams, special_tokens(model).end
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[float, list[int]]] = []
    for step in range(decoding.max_tokens):
        candidates = []
        for beam, (generated, score) in enumerate(beams):
            log_probs = reference_next_scores(model, image, generated, decoding).log_softmax(dim=-1)
            best = log_probs.topk(2 * beam_count)
            for log_prob, token in zip(best.values.tolist(), best.indices.tolist(), strict=True):
                candidates.append((score + log_prob, beam, token))
        candidates.sort(key=lambda candidate: candidate[0], reverse=True)
        next_beams: list[tuple[list[int], float]] = []
        for rank, (score, beam, token) in enumerate(candidates[: 2 * beam_count]):
            if token == end:
                if rank < beam_count:
                    finished.append((score / (step + 1), beams[beam][0]))
            elif len(next_beams) < beam_count:
                next_beams.append(([*beams[beam][0], token], score))
        if len(finished) >= beam_count:
            break
        if step == decoding.max_tokens - 1:
            finished += [(score / decoding.max_tokens, generated) for generated, score in next_beams]
        beams = next_beams
    return max(finished, key=lambda scored: scored[0])[1]


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.5])
def test_greedy_decoding_matches_a_naive_full_prefix_decode_token_for_token(
    model: torch.nn.Module, pixels: torch.Tensor, repetition_penalty: float
) -> None:
    decoding = CocaDecoding("greedy", max_tokens=MAX_TOKENS, min_tokens=1, repetition_penalty=repetition_penalty)
    with torch.no_grad():
        decoded = decode_tokens(model, pixels, decoding, special_tokens(model))
        expected = [reference_greedy(model, image, decoding) for image in pixels]
    lengths = [len(tokens) for tokens in expected]
    assert min(lengths) < MAX_TOKENS and max(lengths) == MAX_TOKENS, "the batch should mix ended and cut captions"
    assert decoded == expected


def test_beam_search_matches_a_naive_beam_search_token_for_token(model: torch.nn.Module, pixels: torch.Tensor) -> None:
    decoding = CocaDecoding("beam", num_beams=3, max_tokens=MAX_TOKENS, min_tokens=1, repetition_penalty=1.5)
    with torch.no_grad():
        decoded = decode_tokens(model, pixels, decoding, special_tokens(model))
        expected = [reference_beam_search(model, image, decoding) for image in pixels]
    assert len({len(tokens) for tokens in expected}) > 1, "images should finish their search at different steps"
    assert decoded == expected


def test_beam_search_with_one_beam_is_greedy_decoding(model: torch.nn.Module, pixels: torch.Tensor) -> None:
    special = special_tokens(model)
    with torch.no_grad():
        beam = decode_tokens(model, pixels, CocaDecoding("beam", num_beams=1, max_tokens=MAX_TOKENS), special)
        greedy = decode_tokens(model, pixels, CocaDecoding("greedy", max_tokens=MAX_TOKENS), special)
    assert beam == greedy


def test_sampling_from_the_single_most_likely_token_is_greedy_decoding(
    model: torch.nn.Module, pixels: torch.Tensor
) -> None:
    special = special_tokens(model)
    with torch.no_grad():
        sampled = decode_tokens(model, pixels, CocaDecoding("sample", top_k=1, max_tokens=MAX_TOKENS), special)
        greedy = decode_tokens(model, pixels, CocaDecoding("greedy", max_tokens=MAX_TOKENS), special)
    assert sampled == greedy


def test_sampling_with_a_seed_is_repeatable(model: torch.nn.Module, pixels: torch.Tensor) -> None:
    decoding = CocaDecoding("sample", top_p=0.9, temperature=1.5, max_tokens=MAX_TOKENS, seed=7)
    with torch.no_grad():
        first = decode_tokens(model, pixels, decoding, special_tokens(model))
        second = decode_tokens(model, pixels, decoding, special_tokens(model))
    assert first == second


def test_no_caption_ends_before_min_tokens(model: torch.nn.Module, pixels: torch.Tensor) -> None:
    special = special_tokens(model)
    unconstrained_decoding = CocaDecoding("greedy", max_tokens=MAX_TOKENS, min_tokens=0)
    constrained_decoding = CocaDecoding("greedy", max_tokens=MAX_TOKENS, min_tokens=4)
    with torch.no_grad():
        unconstrained = decode_tokens(model, pixels, unconstrained_decoding, special)
        constrained = decode_tokens(model, pixels, constrained_decoding, special)
    assert min(len(tokens) for tokens in unconstrained) < 4
    assert min(len(tokens) for tokens in constrained) >= 4


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_decoded_captions_hold_no_special_tokens(model: torch.nn.Module, pixels: torch.Tensor, strategy: str) -> None:
    special = special_tokens(model)
    with torch.no_grad():
        decoded = decode_tokens(model, pixels, CocaDecoding(strategy, max_tokens=MAX_TOKENS, seed=0), special)
    assert all(set(tokens).isdisjoint({special.start, special.end, special.pad}) for tokens in decoded)
    assert all(len(tokens) <= MAX_TOKENS for tokens in decoded)


def test_top_k_keeps_the_k_highest_scores() -> None:
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    kept = filter_top_k_top_p(scores, top_k=2, top_p=1.0)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True]]


def test_top_p_keeps_the_smallest_set_reaching_the_probability_mass() -> None:
    scores = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    assert torch.isfinite(filter_top_k_top_p(scores, top_k=0, top_p=0.7)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(filter_top_k_top_p(scores, top_k=0, top_p=0.5)).tolist() == [[False, True, False, False]]


def test_text_stops_at_end_of_text_and_leaves_out_special_tokens() -> None:
    special = clip_special_tokens(pad=0)
    a, dog, comma, running = 320, 1929, 267, 2761
    tokens = [special.start, a, dog, comma, running, special.end, dog, special.pad]
    assert tokens_to_text(tokens, special) == "a dog, running"


def test_captioner_writes_a_sentence_per_image_from_weights_on_disk(tmp_path: Path) -> None:
    bundle = tiny_bundle(TINY_COCA, save_tiny_checkpoint(TINY_COCA, tmp_path / "coca.pt"))
    captioner = CocaCaptioner(bundle, CocaDecoding("beam", num_beams=2, max_tokens=6, min_tokens=2))
    images = [Image.new("RGB", (40, 30), colour) for colour in ("red", "green", "blue")]
    captions = captioner.caption(images)
    assert len(captions) == 3
    assert all(isinstance(caption, str) and caption for caption in captions)


def test_captioner_refuses_more_tokens_than_the_model_reads(tmp_path: Path) -> None:
    bundle = tiny_bundle(TINY_COCA, save_tiny_checkpoint(TINY_COCA, tmp_path / "coca.pt"))
    with pytest.raises(UserError, match="max_tokens"):
        CocaCaptioner(bundle, CocaDecoding(max_tokens=100))


def test_captioner_refuses_a_clip_model_and_points_to_clip_tags(tmp_path: Path) -> None:
    bundle = tiny_bundle(TINY_CLIP, save_tiny_checkpoint(TINY_CLIP, tmp_path / "clip.pt"))
    with pytest.raises(UserError, match="clip-tags"):
        CocaCaptioner(bundle, CocaDecoding())


def test_decoding_options_are_checked() -> None:
    with pytest.raises(UserError, match="min_tokens"):
        CocaDecoding(max_tokens=5, min_tokens=6)
    with pytest.raises(UserError, match="decoding"):
        CocaDecoding(strategy="nucleus")
