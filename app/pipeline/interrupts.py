"""Ctrl-C during a long loop: finish the current step, save, then stop with an honest message.

A first SIGINT only sets a flag, so the loop reaches a consistent point (a whole batch folded
into the accumulators, a flushed chunk of the activation cache) and checkpoints there before
raising ``app.errors.Interrupted``; a second SIGINT stops at once, as Ctrl-C normally does.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType


class DeferredInterrupt:
    """``with DeferredInterrupt() as stop:`` ... ``if stop.requested: save; raise Interrupted``.

    Outside the main thread (where signal handlers cannot be set) it defers nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: object = None
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # a second Ctrl-C: the user does not want to wait
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
            self._installed = False
