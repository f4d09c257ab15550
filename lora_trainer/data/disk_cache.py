"""Encoder outputs kept on disk between runs, in a hidden folder beside the images: latents (one file per image,
bucket and flip set, named by a digest of the image's bytes, its bucket, its flips and the VAE) and text-encoder
outputs (one file per caption, named by a digest of the caption and the text encoders). An entry's name holds
everything it depends on, so a changed image, caption or model never finds a stale one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_trainer.files import atomic_write
from lora_trainer.models.base import TextConditioning

CACHE_FOLDER = ".lora-trainer-latents"


class DiskCache:
    """Read and write cached encoder outputs of one encoder (named by its `fingerprint`), onto `device`."""

    def __init__(self, fingerprint: str, device: torch.device | str = "cpu"):
        self.fingerprint = fingerprint
        self.device = str(device)

    def latents_path(self, image_path: Path, bucket: tuple[int, int], flips: tuple[bool, ...]) -> Path:
        """Where the latents of `image_path` in `bucket` (each of `flips`) are kept."""
        digest = hashlib.sha256(Path(image_path).read_bytes())
        digest.update(f"|{bucket}|{flips}|{self.fingerprint}".encode())
        return Path(image_path).parent / CACHE_FOLDER / f"{digest.hexdigest()[:40]}.safetensors"

    def text_path(self, folder: Path, caption: str) -> Path:
        """Where the text-encoder outputs of `caption` are kept, for captions of images in `folder`."""
        digest = hashlib.sha256(f"{caption}|{self.fingerprint}".encode())
        return Path(folder) / CACHE_FOLDER / f"text-{digest.hexdigest()[:40]}.safetensors"

    def load_latents(self, path: Path) -> torch.Tensor | None:
        """The latents kept at `path` ([flips, C, h, w]), or None when there are none (or they cannot be read)."""
        tensors = self._load(path)
        return None if tensors is None else tensors["latents"]

    def store_latents(self, path: Path, latents: torch.Tensor) -> None:
        """Keep `latents` ([flips, C, h, w]) at `path`, written atomically."""
        self._store(path, {"latents": latents})

    def load_text(self, path: Path) -> TextConditioning | None:
        """The text conditioning kept at `path`, or None when there is none (or it cannot be read)."""
        tensors = self._load(path)
        return None if tensors is None else TextConditioning(tensors["context"], tensors.get("pooled"))

    def store_text(self, path: Path, text: TextConditioning) -> None:
        """Keep `text` at `path`, written atomically."""
        self._store(path, {"context": text.context} | ({} if text.pooled is None else {"pooled": text.pooled}))

    def _load(self, path: Path) -> dict[str, torch.Tensor] | None:
        if not path.is_file():
            return None
        try:
            return load_file(str(path), device=self.device)
        except Exception:  # a damaged entry is encoded again and replaced
            return None

    def _store(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        plain = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        atomic_write(path, lambda tmp: save_file(plain, str(tmp)))
