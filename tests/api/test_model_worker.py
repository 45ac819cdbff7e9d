"""The model worker's queue: round-robin between jobs at step granularity, streams, cancellation
and an exact `pending` count. No sleeps: the jobs block on events the test releases, and probe
calls (which run after every job queued before them) read the state at known points."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from app.api.model_worker import ModelWorker
from app.errors import BusyError

WAIT = 30  # seconds; only a broken worker ever waits this long


def _stream_steps(name: str, n: int, log: list, worker: ModelWorker,
                  gate: threading.Event | None = None):
    def steps() -> Iterator[str]:
        for i in range(n):
            if i == 0 and gate is not None:
                assert gate.wait(WAIT)
            log.append((name, i, worker.pending))
            yield f"{name}{i}"
    return steps


async def _collect(stream) -> list:
    return [item async for item in stream]


def test_two_long_jobs_and_a_short_call_interleave_with_exact_pending():
    async def scenario() -> None:
        worker = ModelWorker(capacity=4)
        log: list = []
        gate = threading.Event()
        try:
            a = worker.stream(_stream_steps("A", 4, log, worker, gate))
            task_a = asyncio.create_task(_collect(a))
            b = worker.stream(_stream_steps("B", 4, log, worker))
            task_b = asyncio.create_task(_collect(b))

            def short() -> str:
                log.append(("C", 0, worker.pending))
                return "c"

            task_c = asyncio.create_task(worker.run(short))
            await asyncio.sleep(0)  # let task_c admit its job
            assert worker.pending == 3
            gate.set()
            assert await asyncio.wait_for(task_c, WAIT) == "c"
            assert await asyncio.wait_for(task_a, WAIT) == ["A0", "A1", "A2", "A3"]
            assert await asyncio.wait_for(task_b, WAIT) == ["B0", "B1", "B2", "B3"]
            assert worker.pending == 0
        finally:
            worker.close()
        # The short call ran after one step of each long job, not after either finished;
        # a job counts until the step that finds it exhausted.
        assert log == [("A", 0, 3), ("B", 0, 3), ("C", 0, 3), ("A", 1, 2), ("B", 1, 2),
                       ("A", 2, 2), ("B", 2, 2), ("A", 3, 2), ("B", 3, 2)]

    asyncio.run(scenario())


class SteppedJob:
    """An endless stream whose every step waits for the test to release it."""

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)
        self.entered = threading.Semaphore(0)  # released as each step starts to wait
        self.steps_run = 0
        self.closed = threading.Event()

    async def step_started(self) -> None:
        """Wait until the model thread is inside the job's next step."""
        assert await asyncio.to_thread(self.entered.acquire, True, WAIT)

    def __call__(self) -> Iterator[int]:
        try:
            while True:
                self.entered.release()
                assert self.permits.acquire(timeout=WAIT)
                self.steps_run += 1
                yield self.steps_run
        finally:
            self.closed.set()


def test_a_consumer_that_leaves_stops_its_job_after_the_step_in_progress():
    async def scenario() -> None:
        worker = ModelWorker(capacity=3)
        job = SteppedJob()
        try:
            stream = worker.stream(job)
            job.permits.release()
            assert await asyncio.wait_for(stream.__anext__(), WAIT) == 1
            job.permits.release()
            assert await asyncio.wait_for(stream.__anext__(), WAIT) == 2
            assert worker.pending == 1
            # The model thread has gone on to step 3 (it waits for its permit) when the
            # consumer leaves: that step finishes, and no other runs.
            for _ in range(3):
                await job.step_started()
            await stream.aclose()
            job.permits.release(5)
            # A probe runs after the cancelled job's turn: it sees only itself pending.
            assert await asyncio.wait_for(worker.run(lambda: worker.pending), WAIT) == 1
            assert job.closed.is_set()
            assert job.steps_run == 3
            assert worker.pending == 0
        finally:
            worker.close()

    asyncio.run(scenario())


def test_a_consumer_cancelled_during_a_step_stops_its_job_after_that_step():
    async def scenario() -> None:
        worker = ModelWorker(capacity=3)
        job = SteppedJob()
        try:
            stream = worker.stream(job)
            job.permits.release()
            assert await asyncio.wait_for(stream.__anext__(), WAIT) == 1
            # The consumer waits for item 2 while step 2 blocks on the model thread.
            for _ in range(2):
                await job.step_started()
            consumer = asyncio.create_task(stream.__anext__())
            await asyncio.sleep(0)
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consumer
            assert worker.pending == 1  # its step may still be running: it still counts
            job.permits.release(6)  # step 2 finishes; no step after it may run
            assert await asyncio.wait_for(worker.run(lambda: worker.pending), WAIT) == 1
            assert job.closed.is_set()
            assert job.steps_run == 2
            assert worker.pending == 0
        finally:
            worker.close()

    asyncio.run(scenario())


def test_a_cancelled_call_that_never_started_leaves_the_count_at_once():
    async def scenario() -> None:
        worker = ModelWorker(capacity=3)
        job = SteppedJob()
        ran = []
        try:
            stream = worker.stream(job)  # holds the model thread in its first step
            waiting = asyncio.create_task(worker.run(lambda: ran.append(1)))
            await asyncio.sleep(0)
            assert worker.pending == 2
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert worker.pending == 1
            job.permits.release()
            assert await asyncio.wait_for(stream.__anext__(), WAIT) == 1
            await stream.aclose()
            job.permits.release()  # the step the model thread went on to
            assert await asyncio.wait_for(worker.run(lambda: worker.pending), WAIT) == 1
            assert ran == []
        finally:
            worker.close()

    asyncio.run(scenario())


def test_full_queue_refuses_a_stream_before_it_starts_and_errors_reach_the_consumer():
    async def scenario() -> None:
        worker = ModelWorker(capacity=2, retry_after=7)
        job = SteppedJob()
        try:
            held = worker.stream(job)
            other = worker.stream(_stream_steps("X", 1, [], worker))
            with pytest.raises(BusyError) as refused:
                worker.stream(_stream_steps("Y", 1, [], worker))
            assert refused.value.retry_after == 7
            assert worker.pending == 2

            def failing() -> Iterator[int]:
                yield 1
                raise ValueError("step two failed")

            job.permits.release()
            assert await asyncio.wait_for(held.__anext__(), WAIT) == 1
            await held.aclose()
            job.permits.release()  # the step the model thread went on to
            assert await asyncio.wait_for(_collect(other), WAIT) == ["X0"]
            broken = worker.stream(failing)
            assert await asyncio.wait_for(broken.__anext__(), WAIT) == 1
            with pytest.raises(ValueError, match="step two failed"):
                await asyncio.wait_for(broken.__anext__(), WAIT)
            assert worker.pending == 0
        finally:
            worker.close()

    asyncio.run(scenario())
