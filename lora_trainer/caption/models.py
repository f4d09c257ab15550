"""Loading open_clip models for captioning: weights from a local file or an open_clip pretrained tag."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from lora_trainer.errors import UserError

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class OpenClipBundle:
    """A loaded open_clip model with what it needs to see images and read text."""

    model: torch.nn.Module
    """The model, in eval mode, on `device`."""
    preprocess: Callable[[Image.Image], torch.Tensor]
    """The model's evaluation transform: an RGB image to a normalised (3, H, W) tensor."""
    tokenizer: Callable[[list[str]], torch.Tensor]
    """Texts to a (len(texts), context_length) tensor of token ids, padded for this model."""
    device: torch.device


@contextlib.contextmanager
def inference_precision(device: torch.device) -> Iterator[None]:
    """No autograd, and on CUDA bf16 (or fp16 where bf16 is missing) autocast; full precision on the CPU."""
    with torch.inference_mode():
        if device.type != "cuda":
            yield
            return
        half_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast(device_type="cuda", dtype=half_dtype):
            yield


def load_open_clip(arch: str, pretrained: str, device: torch.device) -> OpenClipBundle:
    """Build open_clip architecture `arch` with weights `pretrained` (a file path or an open_clip tag).

    A tag downloads through open_clip's own cache the first time it is used; a message says so first.
    """
    import open_clip

    if arch not in open_clip.list_models():
        raise UserError(f"open_clip has no architecture called {arch!r}. Pick one of open_clip.list_models().")
    weights = _weights_argument(arch, pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights, device=device)
    except AttributeError:
        if not Path(weights).is_file():
            raise
        # open_clip goes on with whatever torch.load returned: None when the WebUI's safe loader refused it.
        raise UserError(f"Could not read the weights file {pretrained}: torch.load gave back no weights. Inside the "
                        "WebUI, its safe loader refuses files that hold Python objects besides tensors, and older "
                        "open_clip (the WebUI's 2.20) reads only PyTorch checkpoints (.pt, .pth, .bin), not "
                        ".safetensors. Save the state dict alone with torch.save, or give an open_clip pretrained "
                        "tag.") from None
    except Exception as error:  # torch, pickle, safetensors and the hub each raise their own kinds
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if Path(weights).is_file():
            advice = ("Check that the file is whole (download it again) and that the weights were trained with "
                      "this architecture, or name the right one.")
        else:
            advice = ("If this machine is offline, download the weights elsewhere and point at the file: "
                      f"--pretrained path/to/weights.bin --arch {arch}.")
        raise UserError(f"Could not load the weights {pretrained} into {arch} ({reason}). {advice}") from None
    model.eval()
    context_length = getattr(model, "context_length", None) or model.text.context_length
    tokenizer = functools.partial(open_clip.get_tokenizer(arch), context_length=context_length)
    return OpenClipBundle(model=model, preprocess=preprocess, tokenizer=tokenizer, device=device)


def _weights_argument(arch: str, pretrained: str) -> str:
    """`pretrained` as open_clip takes it, after checking it names a file or a tag open_clip knows."""
    import open_clip

    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path)
    if path.suffix in _CHECKPOINT_SUFFIXES or len(path.parts) > 1:
        raise UserError(f"Weights file {path} does not exist. Fix the path, or give an open_clip pretrained tag.")
    known_tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained not in known_tags:
        raise UserError(
            f"{pretrained!r} is neither a weights file nor a pretrained tag of {arch}. "
            f"Tags open_clip knows for {arch}: {', '.join(known_tags) or 'none'}."
        )
    print(
        f"Loading {arch} ({pretrained}). The first time, open_clip downloads these weights into its cache "
        "(this can take a while); later runs reuse them.",
        flush=True,
    )
    return pretrained
