"""Training processes launched as torchrun starts them (RANK, WORLD_SIZE, MASTER_PORT, ...) but forked from the
test process, which has imported everything already: a fresh interpreter per process would take most of a test's
time."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from lora_trainer.cli import main


def fork_processes(count: int, output: Path, work: Callable[[], int]) -> list[int]:
    """Fork `count` processes of one launch (RANK, WORLD_SIZE, a free MASTER_PORT, ...) that each run `work`
    and exit with what it returns; each writes its stdout and stderr to `output/rank-N.out` and `.err`.
    Returns their process ids."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output.mkdir(exist_ok=True)
    pids = []
    for rank in range(count):
        pid = os.fork()
        if pid == 0:
            exit_code = 1
            try:
                from accelerate.state import AcceleratorState, PartialState

                # The test process may have trained alone already: its accelerate state says one process.
                AcceleratorState._reset_state()
                PartialState._reset_state()
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(count),
                                  RANK=str(rank), LOCAL_RANK=str(rank))
                sys.stdout = open(output / f"rank-{rank}.out", "w", buffering=1)  # noqa: SIM115
                sys.stderr = open(output / f"rank-{rank}.err", "w", buffering=1)  # noqa: SIM115
                exit_code = work()
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(exit_code)
        pids.append(pid)
    return pids


def start_processes(config: Path, count: int, output: Path) -> list[int]:
    """Fork `count` processes that train `config` together (see `fork_processes`)."""
    return fork_processes(count, output, lambda: main(["train", "--config", str(config)]))


def signal_the_second(config: Path, output: Path, signum: int, timeout: float) -> list[int | None]:
    """Start two processes training `config` and, once the steps began, send `signum` to the second (not the
    main one, which must learn of it from the other). Their exit codes, each awaited up to `timeout` s (None:
    still running, then killed); a stopped second one is not awaited."""
    pids = start_processes(config, 2, output)
    try:
        wait_for_training(output)
        os.kill(pids[1], signum)
        main_exit_code = exit_code_of(pids[0], timeout)
        return [main_exit_code, None if signum == signal.SIGSTOP else exit_code_of(pids[1], timeout)]
    finally:
        end_processes(pids)


def exit_code_of(pid: int, timeout: float) -> int | None:
    """The exit code of forked process `pid` once it ends, or None if it is still running after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    return None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file."""
    from safetensors.torch import load_file

    return load_file(str(path))


def wait_for_training(processes_folder: Path) -> None:
    """Wait until the main process has printed the plan: the caches are filled and the steps begin."""
    main_output = processes_folder / "rank-0.out"
    deadline = time.monotonic() + 120
    while not (main_output.exists() and "steps over" in main_output.read_text()):
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.2)
    time.sleep(1)


def end_processes(pids: list[int]) -> None:
    """Kill and reap the forked processes that are still there."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):  # it ended and was reaped already
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
