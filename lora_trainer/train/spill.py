"""The spill warning: on Windows, a GPU whose memory is full silently borrows shared system memory and every step
becomes many times slower. A run watches its step time and the GPU memory it holds, and says so once when the
step time jumps while the memory is near the limit."""

from __future__ import annotations

from collections.abc import Callable
from statistics import median

import torch

SLOWDOWN = 2.5
"""How many times the starting step time counts as a jump."""
NEAR_LIMIT = 0.9
"""Share of the GPU's memory held by PyTorch that counts as near the limit."""
BASELINE_WINDOWS = 3
"""Speed measurements (after the first, which includes warm-up) that set the starting step time."""

MemoryReading = Callable[[], float | None]
"""The share of the device's memory PyTorch holds now (None where it is not known)."""


def spill_warning(step_seconds: list[float], memory_shares: list[float]) -> str | None:
    """The warning when the latest step times are `SLOWDOWN` times the starting ones while the memory held was
    near the limit, or None. `step_seconds` are seconds per step of successive measurements (the first is
    warm-up and ignored) and `memory_shares` the memory share read with each."""
    if len(step_seconds) < BASELINE_WINDOWS + 2:
        return None
    start = median(step_seconds[1:BASELINE_WINDOWS + 1])
    latest = step_seconds[-1]
    if latest < SLOWDOWN * start or memory_shares[-1] < NEAR_LIMIT:
        return None
    return (f"Steps now take {latest / start:.1f}x as long as at the start, with the GPU memory "
            f"{memory_shares[-1]:.0%} full: the driver is probably spilling into shared system memory. Lower "
            "the memory use (the plan line says which setting helps most); on Windows, the NVIDIA Control Panel's "
            "CUDA Sysmem Fallback Policy 'Prefer No Sysmem Fallback' turns the slowdown into an out-of-memory "
            "error instead.")


class SpillWatch:
    """Feeds a run's speed measurements and memory readings to `spill_warning`; `observe` returns its warning
    once."""

    def __init__(self, read_memory: MemoryReading):
        self._read_memory = read_memory
        self._step_seconds: list[float] = []
        self._memory_shares: list[float] = []
        self._warned = False

    def observe(self, seconds_per_step: float) -> str | None:
        """A new speed measurement; the warning the first time it applies."""
        share = self._read_memory()
        if share is None or self._warned:
            return None
        self._step_seconds.append(seconds_per_step)
        self._memory_shares.append(share)
        warning = spill_warning(self._step_seconds, self._memory_shares)
        self._warned = warning is not None
        return warning


def memory_share_reader(device: torch.device) -> MemoryReading:
    """Reads the share of `device`'s memory PyTorch holds (None on a device other than CUDA)."""
    if device.type != "cuda":
        return lambda: None
    total = torch.cuda.get_device_properties(device).total_memory
    return lambda: torch.cuda.memory_reserved(device) / total
