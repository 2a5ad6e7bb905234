"""SIGTERM and Ctrl-C during a run: stop cleanly, never half-way through a write.

The run session installs one `StopOnSignal` for the run's whole life. Outside the training loop a
signal stops the run at once (`Interrupted`: the session marks it interrupted); inside the loop
(`deferred()`) it only asks the loop to stop after the step in flight, with a checkpoint. A second
Ctrl-C always stops at once. Only the main thread can own signal handlers; elsewhere it is a no-op.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tunekit.console import err as console
from tunekit.errors import Interrupted

_active: list[StopOnSignal] = []  # the handlers installed, innermost last


class StopOnSignal:
    def __init__(self):
        self.signum: int | None = None
        self.deferring = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        if not self.deferring:
            raise Interrupted(f"{name}: stopped before training began; nothing to resume", 128 + signum)
        self.signum = signum
        console.print(f"[yellow]{name}: stopping after this step, with a checkpoint")

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextmanager
def deferred() -> Iterator[StopOnSignal]:
    """The training loop's span: a signal sets `.signum` for the loop to act on after its step.
    Uses the run session's handler, or installs one for this span when there is none (a loop run
    on its own, as benchmarks do)."""
    owned = None if _active else StopOnSignal().__enter__()
    stop = _active[-1]
    stop.deferring, stop.signum = True, None
    try:
        yield stop
    finally:
        stop.deferring = False
        if owned is not None:
            owned.__exit__()
