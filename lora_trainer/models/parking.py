"""Parking: the model parts a run no longer needs (the VAE after caching latents, frozen text encoders after
caching captions) wait in CPU memory, and come back exactly as they were: the same parameter and buffer objects,
each on its own device, in its own dtype, with the same bits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class ParkedModules:
    """A context manager that moves the tensors of `modules` on `device` to CPU memory for the block and back
    afterwards; `lent()` brings them back for a while (sample images, validation)."""

    def __init__(self, modules: list[nn.Module], device: torch.device):
        seen: set[int] = set()
        self._tensors: list[torch.Tensor] = []
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                if id(tensor) not in seen and tensor.device.type == device.type and \
                        (tensor.device.index or 0) == (device.index or 0):
                    seen.add(id(tensor))
                    self._tensors.append(tensor)
        self._copies: list[torch.Tensor] = []

    @property
    def parked(self) -> bool:
        """Whether the tensors are in CPU memory now."""
        return bool(self._copies)

    def __enter__(self) -> ParkedModules:
        self._park()
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    @contextmanager
    def lent(self) -> Iterator[None]:
        """The parked modules back on their devices for the block, parked again afterwards."""
        self._restore()
        try:
            yield
        finally:
            self._park()

    def _park(self) -> None:
        with torch.no_grad():
            for tensor in self._tensors:
                self._copies.append(tensor.data.to("cpu", copy=True))
                # An empty tensor of the same kind keeps the object (and its dtype and device) while the
                # device memory is freed.
                tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)

    def _restore(self) -> None:
        with torch.no_grad():
            for tensor, copy in zip(self._tensors, self._copies):
                tensor.data = copy.to(tensor.device)
        self._copies = []
