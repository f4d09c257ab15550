"""CoCa captions: our own decoding loop (greedy, top-k/top-p sampling, beam search) over open_clip's CoCa.

open_clip's `CoCa.generate` leans on transformers' generation internals, which differ between the
transformers the WebUI pins (4.30) and current ones (5.x). This module needs only the model's own
towers: the image tower once per image, then the text tower and the multimodal decoder one token at
a time, with their attention keys and values cached so each step costs one token, not the whole prefix.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from lora_trainer.caption.models import OpenClipBundle, inference_precision
from lora_trainer.errors import UserError

DECODING_STRATEGIES = ("beam", "greedy", "sample")


@dataclass(frozen=True)
class CocaDecoding:
    """How CoCa's next-token scores become a caption."""

    strategy: str = "beam"
    """"beam" (beam search), "greedy" (most likely token each step) or "sample" (random, see top_k/top_p)."""
    num_beams: int = 4
    """Beams kept by beam search; the search ends for an image once this many captions are complete."""
    max_tokens: int = 30
    """Longest caption, in tokens; longer ones are cut here. At most the model's text context length."""
    min_tokens: int = 5
    """Shortest caption, in tokens: end-of-text cannot be chosen before."""
    repetition_penalty: float = 1.0
    """Above 1 makes tokens already in the caption less likely (as in CTRL); 1 leaves scores alone."""
    temperature: float = 1.0
    """Sampling only: below 1 sharpens the distribution, above 1 flattens it."""
    top_k: int = 0
    """Sampling only: draw from the k most likely tokens; 0 for no limit."""
    top_p: float = 1.0
    """Sampling only: draw from the smallest set of tokens whose probability adds up to top_p."""
    seed: int | None = None
    """Sampling only: seed for repeatable captions."""

    def __post_init__(self) -> None:
        if self.strategy not in DECODING_STRATEGIES:
            raise UserError(f"Unknown decoding {self.strategy!r}; use one of {', '.join(DECODING_STRATEGIES)}.")
        if self.num_beams < 1:
            raise UserError(f"num_beams must be at least 1, got {self.num_beams}.")
        if not 1 <= self.max_tokens:
            raise UserError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise UserError(f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}.")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be above 0, got {self.repetition_penalty}.")
        if self.temperature <= 0:
            raise UserError(f"temperature must be above 0 (use greedy decoding for 0), got {self.temperature}.")
        if self.top_k < 0:
            raise UserError(f"top_k must be 0 (no limit) or more, got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}.")


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids with a meaning of their own in CLIP's vocabulary as CoCa uses it."""

    start: int
    end: int
    pad: int


class CocaCaptioner:
    """A sentence per image from an open_clip CoCa model."""

    def __init__(self, bundle: OpenClipBundle, decoding: CocaDecoding) -> None:
        check_supported_coca(bundle.model)
        if decoding.max_tokens > bundle.model.text.context_length:
            raise UserError(
                f"max_tokens is {decoding.max_tokens}, but this CoCa reads at most "
                f"{bundle.model.text.context_length} tokens. Lower max_tokens."
            )
        self.bundle = bundle
        self.decoding = decoding
        self.special = clip_special_tokens(pad=bundle.model.pad_id)

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in order."""
        pixels = torch.stack([self.bundle.preprocess(image) for image in images])
        with inference_precision(self.bundle.device):
            token_lists = decode_tokens(self.bundle.model, pixels, self.decoding, self.special)
        return [tokens_to_text(tokens, self.special) for tokens in token_lists]


def check_supported_coca(model: torch.nn.Module) -> None:
    """Raise `UserError` unless `model` is a CoCa whose towers this decoder can run step by step."""
    import open_clip
    from open_clip.transformer import ResidualAttentionBlock, TextTransformer

    if not isinstance(model, open_clip.CoCa):
        raise UserError(
            f"CoCa captions need a CoCa model (coca_ViT-L-14, coca_ViT-B-32); this is {type(model).__name__}. "
            "Use the clip-tags captioner for CLIP models."
        )
    blocks = [*model.text.transformer.resblocks, *model.text_decoder.resblocks, *model.text_decoder.cross_attn]
    supported = (
        isinstance(model.text, TextTransformer)
        and model.text.cls_emb is not None
        and all(type(block) is ResidualAttentionBlock and block.attn.in_proj_weight is not None for block in blocks)
    )
    if not supported:
        raise UserError("This CoCa variant has text or decoder blocks the caption decoder does not support.")


@functools.cache
def _clip_bpe():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clip_special_tokens(pad: int) -> SpecialTokens:
    """Start and end of text from CLIP's BPE vocabulary, with the model's padding id."""
    encoder = _clip_bpe().encoder
    return SpecialTokens(start=encoder["<start_of_text>"], end=encoder["<end_of_text>"], pad=pad)


def tokens_to_text(tokens: list[int], special: SpecialTokens) -> str:
    """Readable text for generated token ids: up to end-of-text, without special tokens."""
    if special.end in tokens:
        tokens = tokens[: tokens.index(special.end)]
    words = [token for token in tokens if token not in (special.start, special.pad)]
    text = " ".join(_clip_bpe().decode(words).split())
    # CLIP's BPE splits punctuation into tokens of its own, so decoding leaves a space before it.
    return re.sub(r" (?=[.,!?;:'])", "", text)


def decode_tokens(
    model: torch.nn.Module, pixels: torch.Tensor, decoding: CocaDecoding, special: SpecialTokens
) -> list[list[int]]:
    """Caption token ids for each image in `pixels` (preprocessed, batched), special tokens left out.

    `model` must pass `check_supported_coca`, and `decoding.max_tokens` must fit its text context length.
    """
    parameter = next(model.parameters())
    pixels = pixels.to(device=parameter.device, dtype=parameter.dtype)
    _, image_embs = model.visual(pixels)
    if decoding.strategy == "beam":
        return _beam_search(model, image_embs, decoding, special)
    return _greedy_or_sample(model, image_embs, decoding, special)


def filter_top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """`scores` with every token outside the top k, and outside the top-p nucleus, set to -inf."""
    if top_k > 0:
        kth_best = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def _next_token_scores(
    logits: torch.Tensor, generated: torch.Tensor, decoding: CocaDecoding, special: SpecialTokens
) -> torch.Tensor:
    """Logits for the next token after the rules: no start or padding, no end before min_tokens, repetition."""
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
    scores[:, [special.start, special.pad]] = float("-inf")
    if generated.shape[1] < decoding.min_tokens:
        scores[:, special.end] = float("-inf")
    if decoding.repetition_penalty != 1.0 and generated.shape[1] > 0:
        seen = scores.gather(1, generated)
        penalised = torch.where(seen > 0, seen / decoding.repetition_penalty, seen * decoding.repetition_penalty)
        scores = scores.scatter(1, generated, penalised)
    return scores


def _greedy_or_sample(
    model: torch.nn.Module, image_embs: torch.Tensor, decoding: CocaDecoding, special: SpecialTokens
) -> list[list[int]]:
    """Greedy or sampled decoding; a caption leaves the batch as soon as it ends."""
    image_count = image_embs.shape[0]
    device = image_embs.device
    generator = None
    if decoding.strategy == "sample" and decoding.seed is not None:
        generator = torch.Generator(device=device).manual_seed(decoding.seed)
    steps = _IncrementalCoca(model, image_embs)
    row_images = list(range(image_count))
    generated = torch.empty(image_count, 0, dtype=torch.long, device=device)
    current = torch.full((image_count,), special.start, dtype=torch.long, device=device)
    captions: list[list[int]] = [[] for _ in range(image_count)]
    for step in range(decoding.max_tokens):
        scores = _next_token_scores(steps.next_logits(current), generated, decoding, special)
        if decoding.strategy == "greedy":
            current = scores.argmax(dim=-1)
        else:
            scores = filter_top_k_top_p(scores / decoding.temperature, decoding.top_k, decoding.top_p)
            current = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[:, 0]
        generated = torch.cat([generated, current[:, None]], dim=1)
        ended = (current == special.end).tolist()
        last_step = step == decoding.max_tokens - 1
        for row, (image, row_ended) in enumerate(zip(row_images, ended, strict=True)):
            if row_ended or last_step:
                captions[image] = generated[row, : -1 if row_ended else None].tolist()
        live_rows = [row for row, row_ended in enumerate(ended) if not row_ended]
        if last_step or not live_rows:
            break
        if len(live_rows) < len(row_images):
            live = torch.tensor(live_rows, device=device)
            steps.keep_rows(live)
            generated, current = generated[live], current[live]
            row_images = [row_images[row] for row in live_rows]
    return captions


def _beam_search(
    model: torch.nn.Module, image_embs: torch.Tensor, decoding: CocaDecoding, special: SpecialTokens
) -> list[list[int]]:
    """Beam search for all images at once; an image stops once `num_beams` of its captions have ended.

    Captions compete on their mean token log-probability, end-of-text included, so short captions have
    no head start. Images that finish leave the batch.
    """
    beam_count = decoding.num_beams
    device = image_embs.device
    searching = list(range(image_embs.shape[0]))
    steps = _IncrementalCoca(model, image_embs.repeat_interleave(beam_count, dim=0))
    rows = len(searching) * beam_count
    generated = torch.empty(rows, 0, dtype=torch.long, device=device)
    current = torch.full((rows,), special.start, dtype=torch.long, device=device)
    # Only the first beam of each image is live at the start, so the beams do not all pick the same token.
    beam_scores = torch.full((len(searching), beam_count), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in searching]
    for step in range(decoding.max_tokens):
        log_probs = _next_token_scores(steps.next_logits(current), generated, decoding, special).log_softmax(dim=-1)
        vocab_size = log_probs.shape[-1]
        candidates = (beam_scores.reshape(-1, 1) + log_probs).reshape(len(searching), beam_count * vocab_size)
        top_scores, top_indices = candidates.topk(2 * beam_count, dim=1)
        caption_length = step + 1
        next_rows: list[int] = []
        next_tokens: list[int] = []
        next_scores: list[float] = []
        still_searching: list[int] = []
        ranked = zip(searching, top_scores.tolist(), top_indices.tolist(), strict=True)
        for position, (image, scores, indices) in enumerate(ranked):
            ended, continued = _split_candidates(scores, indices, vocab_size, beam_count, special.end)
            first_row = position * beam_count
            for beam, score in ended:
                finished[image].append((score / caption_length, generated[first_row + beam].tolist()))
            if len(finished[image]) >= beam_count:
                continue
            if step == decoding.max_tokens - 1:
                for beam, token, score in continued:
                    finished[image].append((score / caption_length, [*generated[first_row + beam].tolist(), token]))
                continue
            still_searching.append(image)
            for beam, token, score in continued:
                next_rows.append(first_row + beam)
                next_tokens.append(token)
                next_scores.append(score)
        if not still_searching:
            break
        source_rows = torch.tensor(next_rows, device=device)
        steps.keep_rows(source_rows)
        current = torch.tensor(next_tokens, device=device)
        generated = torch.cat([generated[source_rows], current[:, None]], dim=1)
        beam_scores = torch.tensor(next_scores, dtype=log_probs.dtype, device=device).reshape(-1, beam_count)
        searching = still_searching
    return [max(image_captions, key=lambda scored: scored[0])[1] for image_captions in finished]


def _split_candidates(
    scores: list[float], indices: list[int], vocab_size: int, beam_count: int, end: int
) -> tuple[list[tuple[int, float]], list[tuple[int, int, float]]]:
    """One image's best candidates, best first, split into captions that end here, as (beam, score), and the
    `beam_count` best that go on, as (beam, token, score). An ending counts only among the top `beam_count`.
    """
    ended: list[tuple[int, float]] = []
    continued: list[tuple[int, int, float]] = []
    for rank, (score, index) in enumerate(zip(scores, indices, strict=True)):
        beam, token = divmod(index, vocab_size)
        if token != end:
            continued.append((beam, token, score))
            if len(continued) == beam_count:
                break
        elif rank < beam_count:
            ended.append((beam, score))
    return ended, continued


class _IncrementalCoca:
    """CoCa's text tower and multimodal decoder, fed one token per step for a batch of rows.

    Each self-attention layer keeps the keys and values of the tokens seen so far, so a step attends
    to the past without recomputing it; that is exactly the causal attention of the full forward pass.
    CoCa's class token sits after the text and is not needed for decoding, so it is never computed.
    """

    def __init__(self, model: torch.nn.Module, image_embs: torch.Tensor) -> None:
        self.text = model.text
        self.decoder = model.text_decoder
        self.dtype = self.text.transformer.get_cast_dtype()
        self.position = 0
        layer_count = len(self.text.transformer.resblocks) + len(self.decoder.resblocks)
        self.self_keys: list[torch.Tensor | None] = [None] * layer_count
        self.self_values: list[torch.Tensor | None] = [None] * layer_count
        self.cross_keys: list[torch.Tensor] = []
        self.cross_values: list[torch.Tensor] = []
        for block in self.decoder.cross_attn:
            image_context = block.ln_1_kv(image_embs)
            self.cross_keys.append(_heads(block.attn, image_context, part=1))
            self.cross_values.append(_heads(block.attn, image_context, part=2))

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for the token after `tokens` (one per row), given the earlier steps."""
        hidden = self.text.token_embedding(tokens[:, None]).to(self.dtype)
        hidden = hidden + self.text.positional_embedding[self.position].to(self.dtype)
        self.position += 1
        for layer, block in enumerate(self.text.transformer.resblocks):
            hidden = self._self_attention_block(layer, block, hidden)
        text_layer_count = len(self.text.transformer.resblocks)
        for layer, (block, cross_block) in enumerate(zip(self.decoder.resblocks, self.decoder.cross_attn, strict=True)):
            hidden = self._self_attention_block(text_layer_count + layer, block, hidden)
            hidden = _residual_block(cross_block, hidden, self.cross_keys[layer], self.cross_values[layer])
        logits = self.decoder.ln_final(hidden) @ self.decoder.text_projection
        return logits[:, 0]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Carry on with these rows only, in this order (finished captions leave, beams are reordered)."""
        self.self_keys = [keys.index_select(0, rows) for keys in self.self_keys]
        self.self_values = [values.index_select(0, rows) for values in self.self_values]
        self.cross_keys = [keys.index_select(0, rows) for keys in self.cross_keys]
        self.cross_values = [values.index_select(0, rows) for values in self.cross_values]

    def _self_attention_block(self, layer: int, block: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        normed = block.ln_1(hidden)
        keys, values = _heads(block.attn, normed, part=1), _heads(block.attn, normed, part=2)
        if self.self_keys[layer] is not None:
            keys = torch.cat([self.self_keys[layer], keys], dim=2)
            values = torch.cat([self.self_values[layer], values], dim=2)
        self.self_keys[layer], self.self_values[layer] = keys, values
        return _residual_block(block, hidden, keys, values, normed=normed)


def _heads(attention: torch.nn.MultiheadAttention, hidden: torch.Tensor, part: int) -> torch.Tensor:
    """Query (part 0), key (1) or value (2) projection of `hidden`, split into heads: (rows, heads, tokens, dim)."""
    width = attention.embed_dim
    weight = attention.in_proj_weight[part * width : (part + 1) * width]
    bias = None if attention.in_proj_bias is None else attention.in_proj_bias[part * width : (part + 1) * width]
    projected = F.linear(hidden, weight, bias)
    return projected.unflatten(-1, (attention.num_heads, -1)).transpose(1, 2)


def _residual_block(
    block: torch.nn.Module,
    hidden: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    normed: torch.Tensor | None = None,
) -> torch.Tensor:
    """open_clip's `ResidualAttentionBlock.forward` for new tokens attending to precomputed keys and values."""
    queries = _heads(block.attn, block.ln_1(hidden) if normed is None else normed, part=0)
    attended = F.scaled_dot_product_attention(queries, keys.to(queries.dtype), values.to(queries.dtype))
    attended = block.attn.out_proj(attended.transpose(1, 2).flatten(2))
    hidden = hidden + block.ls_1(attended)
    return hidden + block.ls_2(block.mlp(block.ln_2(hidden)))
