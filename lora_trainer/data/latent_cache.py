"""Latents kept on disk between runs: one file per image, bucket and flip set, in a hidden folder beside the
images, named by a digest of the image's bytes, its bucket, its flips and the VAE (`vae_fingerprint`), so a
changed image or another model never finds a stale entry."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_trainer.files import atomic_write

CACHE_FOLDER = ".lora-trainer-latents"


class LatentDiskCache:
    """Read and write cached latents for one VAE; latents are read onto `device`."""

    def __init__(self, vae_fingerprint: str, device: torch.device | str = "cpu"):
        self.vae_fingerprint = vae_fingerprint
        self.device = str(device)

    def path_for(self, image_path: Path, bucket: tuple[int, int], flips: tuple[bool, ...]) -> Path:
        """Where the latents of `image_path` in `bucket` (each of `flips`) are kept."""
        digest = hashlib.sha256(Path(image_path).read_bytes())
        digest.update(f"|{bucket}|{flips}|{self.vae_fingerprint}".encode())
        return Path(image_path).parent / CACHE_FOLDER / f"{digest.hexdigest()[:40]}.safetensors"

    def load(self, path: Path) -> torch.Tensor | None:
        """The latents kept at `path` ([flips, C, h, w]), or None when there are none (or they cannot be read)."""
        if not path.is_file():
            return None
        try:
            return load_file(str(path), device=self.device)["latents"]
        except Exception:  # a damaged entry is encoded again and replaced
            return None

    def store(self, path: Path, latents: torch.Tensor) -> None:
        """Keep `latents` ([flips, C, h, w]) at `path`, written atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({"latents": latents.detach().cpu().contiguous()}, str(tmp)))
