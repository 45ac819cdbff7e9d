"""The bounded queue in front of the model: one model thread running admitted jobs in turn.

A job is either a call (one step: a text search) or a stream (a generator on the model thread,
one step per item: a generation, one token per step). The thread takes the admitted jobs
round-robin, one step each, so a short call waits for at most one step of each long job ahead
of it, never for a whole 256-token generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from app.errors import BusyError, UnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")

_ITEM, _DONE, _ERROR = "item", "done", "error"


class _Job:
    """One admitted job: what it runs, where its results go, and whether its consumer left."""

    def __init__(self, *, call: Callable[[], Any] | None,
                 steps: Callable[[], Iterator[Any]] | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.call = call
        self.steps = steps
        self.loop = loop
        self.results: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.gen: Iterator[Any] | None = None  # created on the model thread at the first step
        self.cancelled = False
        self.finished = False

    def deliver(self, kind: str, value: Any = None) -> None:
        """Hand a result to the consumer on its event loop (called on the model thread)."""
        # A closed loop (RuntimeError) means nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.results.put_nowait, (kind, value))


class ModelWorker:
    """Runs model jobs one step at a time on a single thread, off the event loop.

    At most `capacity` jobs are admitted (running, between steps or waiting); one more is
    refused at once with BusyError (503 + Retry-After) instead of queueing without bound.
    `pending` counts a job from its admission until it has left the model thread, so it stays
    exact when a consumer goes away: a job that never started leaves at once, a started one at
    its next turn (it runs no further step). One thread because torch already uses every core
    for one forward pass, and the model's hooks are not safe to share between threads.
    """

    def __init__(self, *, capacity: int, retry_after: int = 2) -> None:
        if capacity < 1:
            raise ValueError("model queue capacity must be >= 1")
        self.capacity = capacity
        self.retry_after = retry_after
        self._lock = threading.Condition()
        self._ready: deque[_Job] = deque()  # admitted jobs waiting for their next step
        self._side: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._pending = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="saescope-model", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Jobs admitted and not yet finished (running, between steps or waiting)."""
        with self._lock:
            return self._pending

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the model thread, as one step in the round-robin."""
        job = self._admit(call=lambda: fn(*args, **kwargs), steps=None)
        try:
            kind, value = await job.results.get()
        except asyncio.CancelledError:
            self._cancel(job)
            raise
        if kind == _ERROR:
            raise value
        return value

    def stream(self, steps: Callable[[], Iterator[T]]) -> ModelStream[T]:
        """Run the generator `steps()` on the model thread, one item per turn, and iterate its
        items on the event loop. Admission (or BusyError) happens here, before any iteration,
        so a route can refuse before it starts a response."""
        return ModelStream(self, self._admit(call=None, steps=steps))

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the model thread ahead of the jobs and outside the queue's count (used to
        load the model at start-up)."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise UnavailableError("the server is shutting down")
            self._side.append((fn, future))
            self._lock.notify()
        return future

    def close(self) -> None:
        """Stop taking jobs; waiting jobs end with UnavailableError. A step in progress finishes
        on its own (the thread is a daemon and does not hold up the process's exit)."""
        with self._lock:
            self._closed = True
            waiting, self._ready = list(self._ready), deque()
            side, self._side = list(self._side), deque()
            self._lock.notify_all()
        for job in waiting:
            self._finish(job)
            job.deliver(_ERROR, UnavailableError("the server is shutting down"))
        for _, future in side:
            future.cancel()

    # -- event-loop side -------------------------------------------------------------------

    def _admit(self, *, call: Callable[[], Any] | None,
               steps: Callable[[], Iterator[Any]] | None) -> _Job:
        job = _Job(call=call, steps=steps, loop=asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                raise UnavailableError("the server is shutting down")
            if self._pending >= self.capacity:
                raise BusyError(
                    f"the model is busy ({self._pending} requests queued); retry in "
                    f"{self.retry_after} s (queue size: SAESCOPE_MODEL_QUEUE_SIZE)",
                    retry_after=self.retry_after,
                )
            self._pending += 1
            self._ready.append(job)
            self._lock.notify()
        return job

    def _cancel(self, job: _Job) -> None:
        """The consumer went away: a job that has not started leaves now; a started one is
        closed on the model thread at its next turn."""
        with self._lock:
            job.cancelled = True
            if job.gen is not None or job.finished:
                return
            try:
                self._ready.remove(job)
            except ValueError:  # the model thread holds it: it sees `cancelled` after the step
                return
        self._finish(job)

    # -- model-thread side -----------------------------------------------------------------

    def _finish(self, job: _Job) -> None:
        with self._lock:
            if not job.finished:
                job.finished = True
                self._pending -= 1

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._ready and not self._side and not self._closed:
                    self._lock.wait()
                if self._side:
                    fn, future = self._side.popleft()
                    job = None
                elif self._ready:
                    job = self._ready.popleft()
                else:  # closed and drained
                    return
            if job is None:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                        future.set_exception(exc)
                continue
            if self._step(job):
                with self._lock:
                    if not self._closed:
                        self._ready.append(job)
                        self._lock.notify()
                        continue
                self._close_gen(job)
                self._finish(job)
                job.deliver(_ERROR, UnavailableError("the server is shutting down"))

    def _step(self, job: _Job) -> bool:
        """Run one step of `job`; True when it has more steps to run."""
        if job.cancelled:
            self._close_gen(job)
            self._finish(job)
            return False
        try:
            if job.call is not None:
                value = job.call()
                self._finish(job)
                job.deliver(_ITEM, value)
                return False
            if job.gen is None:
                job.gen = iter(job.steps())
            item = next(job.gen)
        except StopIteration:
            self._finish(job)
            job.deliver(_DONE)
            return False
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._finish(job)
            job.deliver(_ERROR, exc)
            return False
        job.deliver(_ITEM, item)
        if job.cancelled:
            self._close_gen(job)
            self._finish(job)
            return False
        return True

    @staticmethod
    def _close_gen(job: _Job) -> None:
        """Close a started generator on the model thread, so its `finally` blocks (removing
        hooks, freeing caches) run where the model lives."""
        close = getattr(job.gen, "close", None)
        if close is None:
            return
        try:
            close()
        except Exception:  # noqa: BLE001 - the consumer is gone; log and carry on
            log.exception("closing a cancelled model job failed")


class ModelStream(Generic[T]):
    """The event-loop end of a streaming job: `async for item in stream`, then `aclose()` (or
    `async with`). Leaving early, or a cancelled consumer task, cancels the job."""

    def __init__(self, worker: ModelWorker, job: _Job) -> None:
        self._worker = worker
        self._job = job
        self._done = False

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        if self._done:
            raise StopAsyncIteration
        try:
            kind, value = await self._job.results.get()
        except asyncio.CancelledError:
            self._worker._cancel(self._job)
            self._done = True
            raise
        if kind == _ITEM:
            return value
        self._done = True
        if kind == _ERROR:
            raise value
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if not self._job.finished:
            self._worker._cancel(self._job)
        self._done = True

    async def __aenter__(self) -> ModelStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
