"""Data-parallel training over several processes (`accelerate launch`, `torchrun`): which rows of every global
batch a process trains, the decisions every process must take together, and what a lost process means.

With one process (the WebUI tab, a plain `python -m lora_trainer train`) no collective call is made and nothing
needs a process group: a process's share is the whole batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from lora_trainer.errors import UserError


@dataclass(frozen=True)
class ProcessShare:
    """This process's place in the run: process `index` of `count`, each training `batch_size` rows of every
    global batch of `batch_size * count` examples."""

    index: int
    count: int
    batch_size: int

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files, logs and samples."""
        return self.index == 0

    def rows(self, global_rows: int, row_counts: list[int] | None = None) -> tuple[range, float]:
        """The rows of a global batch of `global_rows` examples that this process trains, and the weight of their
        mean loss: DDP averages the processes' gradients, and the weights make that average the gradient of the
        whole batch's mean loss, also when the last batch of a bucket leaves some processes short. A loss that
        is a mean over each row's `row_counts` items (a language model's trained tokens) is weighted by those."""
        start = min(self.index * self.batch_size, global_rows)
        own = range(start, min(start + self.batch_size, global_rows))
        if not own:
            # DDP needs every process's gradients: one the batch is too short for runs its first row, weighted 0.
            return range(1), 0.0
        counts = row_counts or [1] * global_rows
        return own, sum(counts[row] for row in own) * self.count / max(1, sum(counts))


def process_share(accelerator, batch_size: int) -> ProcessShare:
    """This process's share of the run `accelerator` belongs to."""
    return ProcessShare(accelerator.process_index, accelerator.num_processes, batch_size)


def make_accelerator(mixed_precision: str, device: torch.device, timeout_seconds: float):
    """A fresh `Accelerator` for one run on `device`: in a launch of several processes, a process waits at most
    `timeout_seconds` for the others in any collective call, then fails instead of hanging."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise UserError("DeepSpeed (--use_deepspeed in accelerate's config) is not supported: launch with "
                        "--multi_gpu (data-parallel), or for a language model whose base does not fit one GPU "
                        "with --use_fsdp (sharded), which the README describes")

    # One process may train many times (the WebUI): accelerate keeps global state that pins the first
    # run's precision, so it is reset for every run.
    AcceleratorState._reset_state()
    # Layers a step may not reach (module dropout, a text encoder's layers after clip_skip) get no gradients,
    # which DDP must be told to expect.
    return Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu",
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_seconds)),
                                        DistributedDataParallelKwargs(find_unused_parameters=True)])


def process_device(device: torch.device) -> torch.device:
    """`device`, or under a launcher that started several processes with plain `cuda` asked for, this process's
    own GPU (`cuda:LOCAL_RANK`), as accelerate assigns them."""
    if device.type == "cuda" and device.index is None and _launched_several():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _launched_several() -> bool:
    """Whether a launcher (`accelerate launch`, `torchrun`) started several processes for this run."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_as_main() -> bool:
    """Whether this process is the main one of its launch (always, without a launcher)."""
    return int(os.environ.get("RANK", "0")) == 0


def agree(accelerator, *flags: bool) -> list[bool]:
    """Each flag as every process sees it: true when it is true on any process (a Ctrl-C or a stop request that
    reached only one), so that every process stops or saves at the same step."""
    if accelerator.num_processes == 1:
        return list(flags)
    votes = accelerator.reduce(torch.tensor([float(flag) for flag in flags], device=accelerator.device), "sum")
    return [bool(vote) for vote in votes.tolist()]


def mean_over_processes(accelerator, value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over all processes (itself with one)."""
    return value if accelerator.num_processes == 1 else accelerator.reduce(value.clone(), "mean")


def gather_objects(accelerator, value: object) -> list[object]:
    """`value` of every process, in process order, on every process."""
    if accelerator.num_processes == 1:
        return [value]
    gathered: list[object] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, value)
    return gathered


@contextmanager
def reporting_lost_processes(timeout_seconds: float) -> Iterator[None]:
    """Under a launcher of several processes, turn the error of a collective call that another process made
    fail (it died, or did not answer within `timeout_seconds`) into a `UserError` that says so."""
    try:
        yield
    except RuntimeError as error:
        if _launched_several() and _is_lost_process(error):
            raise _lost_process_error(error, timeout_seconds) from None
        raise


LOST_PROCESS_MARKERS = ("gloo", "NCCL", "pair closure", "Connection closed by peer", "Connection reset by peer")
"""Words in the errors of a collective call whose peer died or stopped answering."""


def _is_lost_process(error: BaseException) -> bool:
    """Whether `error` is a collective call that failed because another process died or stopped answering."""
    if torch.distributed.is_available() and isinstance(error, torch.distributed.DistError):
        return True
    # DDP's all-reduce in the backward pass raises the backend's own error as a plain RuntimeError, which does not
    # always name the backend (gloo's "Application timeout caused pair closure").
    return any(marker in str(error) for marker in LOST_PROCESS_MARKERS)


def _lost_process_error(error: BaseException, timeout_seconds: float) -> UserError:
    """What a process tells the user when another one of the run is gone."""
    detail = str(error).splitlines()[0] if str(error) else "no detail"
    return UserError(f"another training process died, or did not answer within distributed_timeout_seconds "
                     f"({timeout_seconds:g} s), so this one stops too; nothing more was saved ({detail}). Look at "
                     "the other processes' output for the reason; if one was only busy (a long save, sample render "
                     "or class images on the main process), raise distributed_timeout_seconds")
