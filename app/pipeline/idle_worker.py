"""Units of work run by an idle-priority background process sharing arrays via mapped files.

The units that process has not done run on the caller's threads (``run_on_threads``). POSIX
only.

A job is a list of independent units ``0 .. n_units - 1`` over named numpy arrays. The caller
says what a unit is with ``runner``, ``"module:function"``: the worker imports it and calls
``function(meta, arrays)``, which returns ``run(i)``; the caller builds the same ``run`` over its
own maps of the same files, so either side can run any unit into the same outputs.

Protocol, one word a line: the worker reports each unit's number on stdout once its outputs are
written, and ``paused`` when it holds (after a ``pause`` word, at once; after a ``step`` word,
once that one unit is reported). It reads ``pause``, ``resume`` and ``step`` on stdin between
units. The caller ends it with a kill; the end of stdin means the caller is gone, and the worker
then removes the files itself.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

Shapes = dict[str, tuple[tuple[int, ...], Any]]


def limit_blas() -> Any:
    """A context manager holding numpy's BLAS to one thread (one unit, one core)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().limit(limits=1, user_api="blas")


def run_on_threads(run: Callable[[int], None], units: Iterable[int], threads: int) -> None:
    """``run(i)`` for every unit, on ``threads`` threads (the caller's included), one BLAS
    thread each; the first error is raised once every thread has stopped."""
    with limit_blas():
        todo = iter(units)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def work() -> None:
            while not errors:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                try:
                    run(i)
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    errors.append(exc)

        pool = [threading.Thread(target=work, name=f"saescope-units-{k}")
                for k in range(threads - 1)]
        for th in pool:
            th.start()
        work()
        for th in pool:
            th.join()
        if errors:
            raise errors[0]


class IdleWorker:
    """A worker process running units in order at nice 19 (and SCHED_IDLE on Linux) with one
    BLAS thread, so it only gets CPU its caller leaves idle.

    ``inputs`` / ``outputs`` are the caller's maps of the shared files; ``done`` the units
    reported so far. A process, not a thread: a thread would share the interpreter lock with the
    caller, and a low-priority thread holding it stalls the caller.
    """

    def __init__(self, *, folder: Path, process: subprocess.Popen,
                 inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        self.folder, self.process = folder, process
        self.inputs, self.outputs = inputs, outputs
        self.done: set[int] = set()
        self._acks = 0  # "paused" lines read
        self._asked = 0  # "pause" and "step" words sent (each is answered by one "paused")
        self._pending = b""
        self._ended = False

    @classmethod
    def start(cls, *, runner: str, meta: dict[str, Any], n_units: int,
              inputs: dict[str, np.ndarray], outputs: Shapes, paused: bool = False
              ) -> IdleWorker:
        """Write the inputs and zeroed outputs to a temporary folder and start the worker
        (held before its first unit when ``paused``). Raises OSError (no room for the files, no
        process) after removing what it wrote."""
        folder = Path(tempfile.mkdtemp(prefix="saescope-idle-"))
        try:
            mapped_in = {}
            for name, arr in inputs.items():
                np.save(folder / f"{name}.npy", arr)
                # From now on read through the file (shared page cache, paged in only if this
                # process runs units), not a private copy.
                mapped_in[name] = np.load(folder / f"{name}.npy", mmap_mode="r")
            mapped_out = {name: np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+",
                                                          dtype=dtype, shape=shape)
                          for name, (shape, dtype) in outputs.items()}
            arrays = {**dict.fromkeys(inputs, "r"), **dict.fromkeys(outputs, "r+")}
            (folder / "job.json").write_text(json.dumps({
                "runner": runner, "meta": meta, "n_units": n_units, "arrays": arrays,
                "paused": paused}))
            package_root = str(Path(__file__).resolve().parents[2])
            env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join(
                       [package_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
            process = subprocess.Popen(
                [sys.executable, "-m", "app.pipeline.idle_worker", str(folder)],
                # Not a session of its own: with the kernel's autogroup scheduling a new session
                # is a new group with a fair share of the CPU, whatever its priority inside.
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        worker = cls(folder=folder, process=process, inputs=mapped_in, outputs=mapped_out)
        worker._asked = int(paused)
        return worker

    def _tell(self, word: str) -> None:
        stdin = self.process.stdin
        if self._ended or stdin is None:
            return
        try:
            stdin.write(word.encode() + b"\n")
            stdin.flush()
        except OSError:
            pass  # it has already ended (all units done, or it failed: the caller reruns them)

    def _read(self, *, block: bool) -> bool:
        """Read one chunk of what the worker wrote (waiting for it if ``block``): True if one
        was read, False if nothing was there or the worker has closed its output."""
        stdout = self.process.stdout
        if stdout is None:
            self._ended = True
        if self._ended:
            return False
        fd = stdout.fileno()
        if not select.select([fd], [], [], None if block else 0)[0]:
            return False
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            self._ended = True
            return False
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            word = line.strip()
            if word.isdigit():
                self.done.add(int(word))
            elif word == b"paused":
                self._acks += 1
        return True

    def _wait_until_held(self) -> None:
        """Until the worker has answered every pause and step sent (or has ended)."""
        while self._acks < self._asked and not self._ended:
            self._read(block=True)

    def progress(self) -> int:
        """Units reported so far (without waiting)."""
        while self._read(block=False):
            pass
        return len(self.done)

    def pause(self, *, wait: bool = False) -> None:
        """The worker takes no new unit until ``resume`` (the unit in progress finishes); with
        ``wait``, return once it holds, every unit it completed reported."""
        self._asked += 1
        self._tell("pause")
        if wait:
            self._wait_until_held()

    def step(self) -> None:
        """While paused: run exactly the next unit, and return once it is reported and the
        worker holds again."""
        self._asked += 1
        self._tell("step")
        self._wait_until_held()

    def resume(self) -> None:
        self._tell("resume")

    def collect(self) -> set[int]:
        """End the worker and return the units it completed. It is killed, not asked to finish
        its unit (at idle priority on a busy machine that could take long): a unit is reported
        only after its outputs are written, so an unreported one must be run again whole."""
        if self.process.returncode is None:
            with contextlib.suppress(OSError):
                self.process.kill()
            while not self._ended:
                self._read(block=True)
            self.process.wait()
            for pipe in (self.process.stdin, self.process.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            self._ended = True
        return self.done

    def close(self) -> None:
        """End the worker and remove its files (the caller's maps stay readable on POSIX)."""
        self.collect()
        shutil.rmtree(self.folder, ignore_errors=True)


def _main(folder: Path) -> None:
    """The worker process: the job's units in order, each reported once its outputs are
    written (see the module docstring)."""
    # A Ctrl-C in the terminal reaches the whole process group: the caller handles it and ends
    # this worker, which must not print a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # if not allowed, it simply competes
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        # Linux: run only when a core would otherwise idle (weaker than nice 19 alone, which
        # still takes a small share of a busy core).
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    job = json.loads((folder / "job.json").read_text())
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode=mode)
              for name, mode in job["arrays"].items()}
    module, _, function = job["runner"].partition(":")
    run = getattr(importlib.import_module(module), function)(job["meta"], arrays)
    fd, pending = sys.stdin.fileno(), b""
    paused, steps = bool(job["paused"]), 0

    def say(word: str) -> None:
        try:
            print(word, flush=True)
        except OSError:  # the caller is gone (its end of the pipe closed)
            shutil.rmtree(folder, ignore_errors=True)
            os._exit(0)  # not return: flushing stdout again at exit would fail the same way

    def read_words(block: bool) -> bool:
        """Act on the words that have arrived (waiting for one if ``block``); False at EOF."""
        nonlocal pending, paused, steps
        if not select.select([fd], [], [], None if block else 0)[0]:
            return True
        chunk = os.read(fd, 4096)
        if not chunk:
            return False
        *lines, pending = (pending + chunk).split(b"\n")
        for word in (line.strip().decode() for line in lines):
            if word == "pause":
                paused = True
                say("paused")
            elif word == "resume":
                paused = False
            elif word == "step":
                steps += 1
        return True

    if paused:
        say("paused")
    with limit_blas():
        for i in range(int(job["n_units"])):
            while True:
                if not read_words(block=paused and not steps):
                    # The caller is gone (killed): nobody else removes the files.
                    shutil.rmtree(folder, ignore_errors=True)
                    return
                if not paused or steps:
                    break
            stepped = paused
            run(i)  # outputs land in the shared pages; the report comes after them
            say(str(i))
            if stepped:
                steps -= 1
                say("paused")
        while True:  # all done: answer steps at once, and wait to be collected (killed)
            if steps:
                steps -= 1
                say("paused")
                continue
            if not read_words(block=True):
                break
        shutil.rmtree(folder, ignore_errors=True)  # or for the caller to be gone


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
