"""The idle worker on a toy job: units run in order in the background process, their outputs
are seen through the caller's maps, pause and step hold it exactly, and close leaves nothing."""

from __future__ import annotations

import os

import numpy as np
import pytest

from app.pipeline.idle_worker import IdleWorker, run_on_threads

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the idle worker is POSIX only")


def doubler(meta, arrays):
    """A runner: unit i writes twice row i of the input, plus meta's offset."""
    def run(i: int) -> None:
        arrays["out"][i] = 2 * arrays["inp"][i] + meta["offset"]
    return run


def test_stepped_units_land_in_the_callers_maps_and_pause_holds():
    inp = np.arange(24, dtype=np.float32).reshape(6, 4)
    worker = IdleWorker.start(runner=f"{__name__}:doubler", meta={"offset": 1}, n_units=6,
                              inputs={"inp": inp}, outputs={"out": ((6, 4), np.float32)},
                              paused=True)
    try:
        assert np.array_equal(worker.inputs["inp"], inp)
        worker.step()
        worker.step()
        assert worker.progress() == 2 and worker.done == {0, 1}
        assert np.array_equal(worker.outputs["out"][:2], 2 * inp[:2] + 1)
        assert not worker.outputs["out"][2:].any()  # held: nothing after the steps
        worker.resume()
        worker.pause(wait=True)
        held = set(worker.done)
        assert held == set(range(len(held)))  # in order
        done = worker.collect()
        assert done == held  # paused until killed
        left = [i for i in range(6) if i not in done]
        run_on_threads(doubler({"offset": 1}, worker.outputs | worker.inputs), left, threads=2)
        assert np.array_equal(worker.outputs["out"], 2 * inp + 1)
    finally:
        worker.close()
    assert worker.process.poll() is not None and not worker.folder.exists()


def test_a_step_after_the_last_unit_is_answered_and_errors_on_threads_are_raised():
    inp = np.ones((2, 3), dtype=np.float32)
    worker = IdleWorker.start(runner=f"{__name__}:doubler", meta={"offset": 0}, n_units=2,
                              inputs={"inp": inp}, outputs={"out": ((2, 3), np.float32)},
                              paused=True)
    try:
        for _ in range(3):  # the third finds nothing left to run, and still returns
            worker.step()
        assert worker.done == {0, 1}
    finally:
        worker.close()

    def fail(i: int) -> None:
        raise ValueError(f"unit {i}")

    with pytest.raises(ValueError, match="unit"):
        run_on_threads(fail, range(4), threads=2)
