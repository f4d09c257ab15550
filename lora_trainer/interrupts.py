"""Ctrl-C and SIGTERM in command-line runs: training finishes the step in flight, saves and exits."""

from __future__ import annotations

import signal

_NAMES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
if hasattr(signal, "SIGHUP"):  # a closed terminal (POSIX only)
    _NAMES[signal.SIGHUP] = "hung up"


class StopSignals:
    """While active (a context manager, main thread only), catches SIGINT, SIGTERM and SIGHUP, unless the
    process was started with them ignored.

    Once `deferring` is on (training has started) the first signal only sets `received`: the loop sees it
    after the step in flight, saves there, so that a resumed run continues exactly, and raises
    KeyboardInterrupt. Before that, and for a second signal, KeyboardInterrupt is raised at once.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferring = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for signum in _NAMES:
            if signal.getsignal(signum) is not signal.SIG_IGN:  # `nohup` and `&` ask for some to be ignored
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        first = self.received is None
        self.received = signum
        if not (first and self.deferring):
            raise KeyboardInterrupt

    def outcome(self) -> tuple[str, int]:
        """What to tell the user and the exit code (128 + the signal's number, as shells report it)."""
        signum = self.received if self.received is not None else signal.SIGINT
        return _NAMES[signum], 128 + int(signum)
