"""The bounded queue in front of the model: one worker thread, a cap on waiting calls, and the
state of the engine service (disabled, loading, ready, failed) that routes check first."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from app.errors import BusyError, UnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelWorker:
    """Runs model calls one at a time on a single thread, off the event loop.

    At most `capacity` calls are admitted (running or waiting); one more is refused at once with
    BusyError (503 + Retry-After) instead of queueing without bound. The counter is only touched
    on the event loop thread, so it needs no lock. One thread because torch already uses every
    core for one forward pass, and the model's hooks are not safe to share between threads.
    """

    def __init__(self, *, capacity: int, retry_after: int = 2) -> None:
        if capacity < 1:
            raise ValueError("model queue capacity must be >= 1")
        self.capacity = capacity
        self.retry_after = retry_after
        self.pending = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saescope-model")

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        if self.pending >= self.capacity:
            raise BusyError(
                f"the model is busy ({self.pending} requests queued); retry in "
                f"{self.retry_after} s (queue size: SAESCOPE_MODEL_QUEUE_SIZE)",
                retry_after=self.retry_after,
            )
        self.pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))
        finally:
            self.pending -= 1

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the model thread outside the queue's count (used to load the model)."""
        return self._executor.submit(fn)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class EngineState:
    """Where the model stands; the service object is opaque here (the API never imports torch)."""

    status: Literal["disabled", "loading", "ready", "failed"] = "disabled"
    message: str = "the server runs without a model (SAESCOPE_LOAD_MODEL=false)"
    service: Any = None

    def require(self) -> Any:
        if self.status == "ready":
            return self.service
        if self.status == "loading":
            raise UnavailableError("the model is still loading; retry in a few seconds",
                                   retry_after=5)
        raise UnavailableError(f"text search needs a model: {self.message}")
