"""The `caption` command: caption a folder of images in place."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from lora_trainer.caption.coca import DECODING_STRATEGIES, CocaDecoding
from lora_trainer.caption.folder import DEFAULT_WEIGHTS, CaptionOptions, caption_folder
from lora_trainer.caption.writer import CAPTION_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `caption` command's arguments to `parser`."""
    defaults = CaptionOptions()
    decoding = CocaDecoding()
    parser.add_argument("folder", type=Path, help="folder of images; captions are written beside them")
    parser.add_argument(
        "--model",
        choices=list(DEFAULT_WEIGHTS),
        default=defaults.model,
        help="coca: a sentence per image; clip-tags: ranked phrases (subject, medium, style, lighting, ...)",
    )
    weights = ", ".join(f"{model}: {arch} {tag}" for model, (arch, tag) in DEFAULT_WEIGHTS.items())
    parser.add_argument("--arch", help=f"open_clip architecture (default {weights})")
    parser.add_argument("--pretrained", help="weights: a local file or an open_clip pretrained tag of --arch")
    parser.add_argument("--prefix", default=defaults.prefix, help='put first in every caption, e.g. "sks style, "')
    parser.add_argument(
        "--mode",
        choices=CAPTION_MODES,
        default=defaults.mode,
        help="images that already have a caption: skip them, overwrite it, or append to it (default: skip)",
    )
    parser.add_argument("--metadata-csv", type=Path, help="also write all captions to this filename,prompt csv")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    coca = parser.add_argument_group("CoCa decoding")
    coca.add_argument("--decoding", choices=DECODING_STRATEGIES, default=decoding.strategy)
    coca.add_argument("--num-beams", type=int, default=decoding.num_beams)
    coca.add_argument("--max-tokens", type=int, default=decoding.max_tokens)
    coca.add_argument("--min-tokens", type=int, default=decoding.min_tokens)
    coca.add_argument("--repetition-penalty", type=float, default=decoding.repetition_penalty)
    coca.add_argument("--temperature", type=float, default=decoding.temperature, help="sample only")
    coca.add_argument("--top-k", type=int, default=decoding.top_k, help="sample only; 0 for no limit")
    coca.add_argument("--top-p", type=float, default=decoding.top_p, help="sample only")
    coca.add_argument("--seed", type=int, help="sample only: seed for repeatable captions")


def run(args: argparse.Namespace) -> int:
    """Caption `args.folder`, show progress, print the summary; 0 when the run went through."""
    options = CaptionOptions(
        model=args.model,
        arch=args.arch,
        pretrained=args.pretrained,
        prefix=args.prefix,
        mode=args.mode,
        metadata_csv=args.metadata_csv,
        batch_size=args.batch_size,
        device=args.device,
        decoding=CocaDecoding(
            strategy=args.decoding,
            num_beams=args.num_beams,
            max_tokens=args.max_tokens,
            min_tokens=args.min_tokens,
            repetition_penalty=args.repetition_penalty,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        ),
    )
    with tqdm(unit="image", dynamic_ncols=True) as bar:

        def show_progress(done: int, total: int, image_path: Path) -> None:
            bar.total = total
            bar.update(done - bar.n)

        report = caption_folder(args.folder, options, progress=show_progress)
    print(report.summary())
    return 0
