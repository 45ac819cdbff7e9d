"""Per-feature facts that need only weights: logit effects and nearest decoder neighbours.

Both are split into independent units of work (a band of features against the whole vocabulary;
a square block of the decoder-cosine matrix), so each thread holds one unit's product whatever
the SAE width (the neighbours' per-block candidates, n keys per row per block, are kept until
the merge: d_sae^2 / block * n * 8 bytes, 10 MB for 16k features, ~0.5 GB for 131k), and any
thread or process may run any unit: ``StaticFeatures`` hands them to a lowest-priority worker
process while a build streams, then runs what is left on every core (see
``StaticFeatures.start_background``). Ranking is a total order, so results do not depend on the
units' order or on who ran them (every unit has the same shape and one BLAS thread wherever it
runs): largest value first (smallest first for the suppressed tokens), and among equal values
the smaller token / feature index first. Equal means equal float32 products: the BLAS may round
the dot products of two identical embeddings differently by their column position, so identical
tokens (real vocabularies hold unused ones) are ordered as their computed values are.

Cost: the matrix products dominate: d_sae x d_in x vocab multiply-adds for the logit effects,
half of d_sae^2 x d_in for the neighbours (cosine similarity is symmetric, so each block of the
similarity matrix serves both its rows and, transposed, its columns). They go through numpy's
BLAS (OpenBLAS, one thread per unit), which on the reference machine (2-core AMD EPYC, AVX2)
multiplies float32 matrices about 1.8x faster than torch's build. Selection is cheap: one pass
takes the max (and one the min) of every block of ``_BLOCK`` columns, and only entries at least
as good as a row's n-th best block extreme are ordered (see ``_best``).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the worker process imports this module without torch
    from torch import Tensor

_BLOCK = 32  # columns per block in the selection's block max / min pass
DEFAULT_BUDGET = 1 << 23  # float32 entries of one unit's product (32 MB)


@dataclass
class LogitEffects:
    pos_ids: np.ndarray  # int32 [d_sae, n] tokens the direction promotes most, largest first
    pos_values: np.ndarray  # float32 [d_sae, n]
    neg_ids: np.ndarray  # int32 [d_sae, n] tokens it suppresses most, most negative first
    neg_values: np.ndarray  # float32 [d_sae, n]


@dataclass
class StaticResult:
    logits: LogitEffects
    neighbour_idx: np.ndarray  # int32 [d_sae, n] most similar decoder directions first
    neighbour_cos: np.ndarray  # float32 [d_sae, n]
    units_total: int = 0
    units_in_background: int = 0  # run by the background worker before finish()
    timings: dict[str, float] = field(default_factory=dict)


# -------------------------------------------------------------------------------- exact selection


def _keys(values: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """int64 sort keys, larger = better: the high 32 bits are the float32 value's bits made
    monotonic (negative floats get their magnitude bits flipped; -0.0 counts as +0.0, as float
    comparison has it), the low 32 bits the column complemented, so the smaller column wins a
    tie."""
    v = values.astype(np.float32) + np.float32(0.0)  # -0.0 + 0.0 = +0.0
    bits = v.view(np.int32)
    bits = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64)
    return (bits << 32) | (0xFFFFFFFF - cols.astype(np.int64))


def _from_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values float32, columns int64) back from ``_keys``."""
    bits = (keys >> 32).astype(np.int32)
    values = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).view(np.float32)
    return values, 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def _group_rank(sorted_groups: np.ndarray) -> np.ndarray:
    return np.arange(sorted_groups.size) - np.searchsorted(sorted_groups, sorted_groups, "left")


def _best(values: np.ndarray, n: int, *, largest: bool, col0: int = 0) -> np.ndarray:
    """Per row of ``values`` [r, w] (any memory layout), the keys (``_keys`` of the value,
    negated when not ``largest``) of its n first entries under (value desc, or asc when not
    ``largest``; then column asc), best first, [r, n]; columns offset by ``col0``.

    Exact without ordering whole rows: group the first nb * _BLOCK columns into nb blocks
    (block j holds columns j, j + nb, j + 2 nb, ...: any partition works, this one is a view)
    and let t be a row's n-th best block extreme (block max when largest). Those n blocks each
    hold an entry at least as good as t, so the row's n best entries are all at least as good
    as t; such an entry lies in a block whose extreme is at least as good as t (n of them, more
    on ties) or in the columns after the blocks. Only those columns are read again, only their
    entries at least as good as t are ordered, by their keys.
    """
    r, w = values.shape
    n = min(n, w)
    nb = w // _BLOCK
    if nb <= n:  # few columns: all are candidates
        rows, cols = np.divmod(np.arange(r * w), w)
        picked = values[rows, cols]
    else:
        blocks = values[:, : nb * _BLOCK].reshape(r, _BLOCK, nb)
        if largest:
            ext = blocks.max(axis=1)
            t = np.partition(ext, nb - n, axis=1)[:, nb - n]
            brow, bcol = np.nonzero(ext >= t[:, None])
        else:
            ext = blocks.min(axis=1)
            t = np.partition(ext, n - 1, axis=1)[:, n - 1]
            brow, bcol = np.nonzero(ext <= t[:, None])
        rows = np.repeat(brow, _BLOCK)
        cols = (bcol[:, None] + np.arange(_BLOCK) * nb).ravel()
        if w > nb * _BLOCK:
            tail = np.arange(nb * _BLOCK, w)
            rows = np.concatenate([rows, np.repeat(np.arange(r), tail.size)])
            cols = np.concatenate([cols, np.tile(tail, r)])
        picked = values[rows, cols]
        keep = picked >= t[rows] if largest else picked <= t[rows]
        rows, cols, picked = rows[keep], cols[keep], picked[keep]
    keys = _keys(picked if largest else -picked, cols + col0)
    order = np.lexsort((~keys, rows))  # by row, then best key first
    rank = _group_rank(rows[order])
    return keys[order][rank < n].reshape(r, n)


# ------------------------------------------------------------------------------------ the units


class _Units:
    """The inputs, the units and the output arrays of one SAE's static features. The arrays
    may be files mapped into memory, so the background worker process and the build's own
    threads fill the same outputs."""

    INPUTS = ("w_dec", "scaled_u", "unit_dec")

    def __init__(self, *, d_sae: int, vocab: int, n_logits: int, n_nb: int,
                 budget_elems: int) -> None:
        self.a: dict[str, np.ndarray] = {}  # inputs and outputs, see ``attach``
        self.d_sae, self.vocab = d_sae, vocab
        self.n_logits, self.n_nb, self.budget_elems = n_logits, n_nb, budget_elems
        d = self.d_sae
        rows = max(1, budget_elems // max(self.vocab, 1))
        self.units: list[tuple[str, int, int]] = []
        if n_logits:
            self.units += [("logits", a, min(a + rows, d)) for a in range(0, d, rows)]
        self.step = max(1, min(d, int(budget_elems ** 0.5)))
        self.first_nb = len(self.units)
        if n_nb:
            self.units += [("neighbours", a, c) for a in range(0, d, self.step)
                           for c in range(a, d, self.step)]
        self._local = threading.local()

    @property
    def meta(self) -> dict[str, int]:
        """What the worker needs to plan the same units."""
        return {"d_sae": self.d_sae, "vocab": self.vocab, "n_logits": self.n_logits,
                "n_nb": self.n_nb, "budget_elems": self.budget_elems}

    def output_shapes(self) -> dict[str, tuple[tuple[int, ...], type]]:
        d, n = self.d_sae, self.n_logits
        n_nb_units = len(self.units) - self.first_nb
        return {"pos_ids": ((d, n), np.int32), "pos_values": ((d, n), np.float32),
                "neg_ids": ((d, n), np.int32), "neg_values": ((d, n), np.float32),
                # per neighbour unit: its rows' candidate keys, then its columns'
                "nb_keys": ((max(n_nb_units, 1), 2, self.step, max(self.n_nb, 1)), np.int64)}

    def attach(self, inputs: dict[str, np.ndarray], make) -> None:
        """Use these inputs, and outputs made by ``make(name, shape, dtype)``."""
        self.a = {**inputs, **{name: make(name, shape, dtype)
                               for name, (shape, dtype) in self.output_shapes().items()}}

    def _product(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """x @ y into this thread's reused buffer: a fresh array this large (past glibc's
        mmap threshold) would be page-faulted in again for every unit."""
        size = x.shape[0] * y.shape[1]
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.size < size:
            buf = self._local.buf = np.empty(size, dtype=np.float32)
        return np.matmul(x, y, out=buf[:size].reshape(x.shape[0], y.shape[1]))

    def run(self, i: int) -> None:
        kind, a, c = self.units[i]
        out = self.a
        if kind == "logits":
            effects = self._product(out["w_dec"][a:c], out["scaled_u"])
            for ids, values, largest in ((out["pos_ids"], out["pos_values"], True),
                                         (out["neg_ids"], out["neg_values"], False)):
                v, cols = _from_keys(_best(effects, self.n_logits, largest=largest))
                ids[a:c] = cols
                values[a:c] = v if largest else -v
            return
        unit = out["unit_dec"]
        b, c1 = min(a + self.step, self.d_sae), min(c + self.step, self.d_sae)
        sims = self._product(unit[a:b], unit[c:c1].T)
        if c == a:
            np.fill_diagonal(sims, -np.inf)  # never its own neighbour
        keys = out["nb_keys"][i - self.first_nb]
        parts = [(0, sims, c)] if c == a else [(0, sims, c), (1, sims.T, a)]
        for side, block, col0 in parts:
            best = _best(block, self.n_nb, largest=True, col0=col0)
            # A block narrower than n gives fewer candidates: pad with the worst key.
            keys[side, : best.shape[0]] = np.iinfo(np.int64).min
            keys[side, : best.shape[0], : best.shape[1]] = best

    def merge_neighbours(self) -> tuple[np.ndarray, np.ndarray]:
        d, n = self.d_sae, self.n_nb
        idx = np.zeros((d, n), dtype=np.int32)
        cos = np.zeros((d, n), dtype=np.float32)
        if not n:
            return idx, cos
        parts: dict[int, list[np.ndarray]] = {}
        for j, (_, a, c) in enumerate(self.units[self.first_nb:]):
            keys = self.a["nb_keys"][j]
            parts.setdefault(a, []).append(keys[0, : min(self.step, d - a)])
            if c != a:
                parts.setdefault(c, []).append(keys[1, : min(self.step, d - c)])
        for row0, got in parts.items():
            keys = np.concatenate(got, axis=1)
            # Each column of a row comes from one block only, so keys are distinct.
            best = ~np.sort(~keys, axis=1)[:, :n]
            v, cols = _from_keys(best)
            idx[row0:row0 + keys.shape[0]] = cols
            cos[row0:row0 + keys.shape[0]] = v
        return idx, cos


def _limit_blas() -> object:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().limit(limits=1, user_api="blas")


class StaticFeatures:
    """Logit effects and decoder neighbours of one SAE, as units of work.

    ``run()`` computes everything on the calling process's threads. A build instead calls
    ``start_background()`` as soon as the weights are loaded, which hands the units, in order,
    to a worker process at the lowest CPU priority, and ``finish()`` after its stream, which
    ends the worker and runs the units it did not report on every core. A process,
    not a thread: a thread would share the interpreter lock with the model's forward pass, and
    a low-priority thread holding it stalls the forward (measured: the stream 7% slower).
    """

    def __init__(self, *, w_dec: Tensor, norm_scale: Tensor, w_u: Tensor, n_logits: int = 10,
                 n_neighbours: int = 10, budget_elems: int = DEFAULT_BUDGET) -> None:
        w = w_dec.detach().float()
        d_sae, vocab = int(w.shape[0]), int(w_u.shape[1])
        self.n_logits = min(n_logits, vocab)
        self.n_nb = max(0, min(n_neighbours, d_sae - 1))
        self.budget_elems = budget_elems
        w_np = np.ascontiguousarray(w.numpy())
        norms = np.linalg.norm(w_np, axis=1, keepdims=True)
        inputs = {
            "w_dec": w_np,
            # The norm's scale folded into W_U once: [d_in, vocab] (for a tied embedding this
            # copy is the only one; the transposed view would make every product strided).
            "scaled_u": np.ascontiguousarray(
                (norm_scale.detach().float()[:, None] * w_u.detach().float()).numpy()),
            "unit_dec": w_np / np.maximum(norms, np.float32(1e-12)),
        }
        self._inputs = inputs
        self._units = _Units(d_sae=d_sae, vocab=vocab, n_logits=self.n_logits, n_nb=self.n_nb,
                             budget_elems=budget_elems)
        self._units.attach(inputs, lambda name, shape, dtype: np.zeros(shape, dtype))
        self._folder: Path | None = None
        self._worker: subprocess.Popen | None = None
        self._done: set[int] = set()  # units the worker reported complete
        self._pending = b""

    @property
    def units_total(self) -> int:
        return len(self._units.units)

    @property
    def units_in_background(self) -> int:
        """Units the worker has reported complete (as read so far)."""
        return len(self._done)

    # the background worker

    def start_background(self) -> None:
        """Hand the units to a worker process (POSIX only; elsewhere ``finish`` does all the
        work) that runs at nice 19 (and SCHED_IDLE on Linux), with one BLAS thread, so it only
        gets CPU the build leaves idle: while the corpus is tokenized, and the gaps of the
        stream. The arrays go through files mapped by both processes, in a temporary folder
        removed by ``finish`` / ``stop``."""
        if self._worker is not None or os.name != "posix" or not self.units_total:
            return
        import tempfile

        folder = None
        try:
            folder = Path(tempfile.mkdtemp(prefix="saescope-static-"))
            inputs = {}
            for name, arr in self._inputs.items():
                np.save(folder / f"{name}.npy", arr)
                # From now on read through the file (shared page cache, paged in only if this
                # process runs units), not a private copy: ~190 MB less resident for a 16k SAE.
                inputs[name] = np.load(folder / f"{name}.npy", mmap_mode="r")

            def mapped(name, shape, dtype):
                return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+",
                                                 dtype=dtype, shape=shape)

            outputs = _Units(**self._units.meta)
            outputs.attach(inputs, mapped)
            (folder / "meta.json").write_text(json.dumps(self._units.meta))
            package_root = str(Path(__file__).resolve().parents[2])
            env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join(
                       [package_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
            self._worker = subprocess.Popen(
                [sys.executable, "-m", "app.pipeline.static_features", str(folder)],
                # Not a session of its own: with the kernel's autogroup scheduling a new session
                # is a new group with a fair share of the CPU, whatever its priority inside
                # (measured: the worker took a whole core and the stream fell to 0.71).
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        except BaseException as exc:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            if not isinstance(exc, OSError):
                raise
            # No room for its files, or no process: the build is only slower.
            sys.stderr.write(f"static features: no background worker ({exc}); the build "
                             "computes them after its stream\n")
            return
        self._folder = folder
        self._units = outputs
        self._inputs = {}

    def _tell(self, word: str) -> None:
        worker = self._worker
        if worker is None or worker.stdin is None:
            return
        try:
            worker.stdin.write(word.encode() + b"\n")
            worker.stdin.flush()
        except OSError:
            pass  # it has already ended (all units done, or it failed: its units rerun here)

    def _read_reports(self, *, block: bool) -> bool:
        """Note the unit numbers the worker has reported (complete lines only); with ``block``,
        until it closes its output. False once it has."""
        worker = self._worker
        if worker is None or worker.stdout is None:
            return False
        fd = worker.stdout.fileno()
        while True:
            ready, _, _ = select.select([fd], [], [], None if block else 0)
            if not ready:
                return True
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return False
            *lines, self._pending = (self._pending + chunk).split(b"\n")
            self._done.update(int(x) for x in lines if x.strip().isdigit())

    def background_progress(self) -> int:
        """Units the worker has completed so far (without waiting)."""
        self._read_reports(block=False)
        return self.units_in_background

    def pause_background(self) -> None:
        """The worker takes no new unit until ``resume_background`` (the unit in progress
        finishes): for a caller that wants every idle cycle for a while, such as a benchmark
        timing the bare model between the build's batches."""
        self._tell("pause")

    def resume_background(self) -> None:
        self._tell("resume")

    def _collect(self) -> None:
        """End the worker and note the units it completed. It is killed, not asked to finish its
        unit (at idle priority on a busy machine that could take long): a unit is reported only
        after its outputs are written, and an unreported one is rewritten whole when it runs
        here."""
        worker = self._worker
        if worker is None:
            return
        with contextlib.suppress(OSError):
            worker.kill()
        self._read_reports(block=True)
        worker.wait()
        for pipe in (worker.stdin, worker.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._worker = None

    def stop(self) -> None:
        """Stop the worker (an abandoned build) and remove its files."""
        self._collect()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def finish(self, threads: int | None = None) -> StaticResult:
        """End the worker (see ``_collect``), run the units it did not do on ``threads``
        threads (default: every core), one BLAS thread each, and return the merged result."""
        t0 = time.perf_counter()
        self._collect()
        left = [i for i in range(self.units_total) if i not in self._done]
        threads = max(1, min(threads or os.cpu_count() or 1, len(left)))
        if left:
            with _limit_blas():
                todo = iter(left)
                lock = threading.Lock()
                errors: list[BaseException] = []

                def work() -> None:
                    while not errors:
                        with lock:
                            i = next(todo, None)
                        if i is None:
                            return
                        try:
                            self._units.run(i)
                        except BaseException as exc:  # noqa: BLE001 - re-raised below
                            errors.append(exc)

                pool = [threading.Thread(target=work, name=f"saescope-static-{k}")
                        for k in range(threads - 1)]
                for th in pool:
                    th.start()
                work()
                for th in pool:
                    th.join()
                if errors:
                    raise errors[0]
        t1 = time.perf_counter()
        idx, cos = self._units.merge_neighbours()
        a = self._units.a
        logits = LogitEffects(**{name: np.array(a[name]) for name in
                                 ("pos_ids", "pos_values", "neg_ids", "neg_values")})
        self.stop()
        return StaticResult(logits=logits, neighbour_idx=idx, neighbour_cos=cos,
                            units_total=self.units_total,
                            units_in_background=self.units_in_background,
                            timings={"static_finish": t1 - t0,
                                     "static_merge": time.perf_counter() - t1})

    def run(self, threads: int | None = None) -> StaticResult:
        """Everything now, on ``threads`` threads (default: every core)."""
        return self.finish(threads)


def _worker_main(folder: Path) -> None:
    """The background worker: units in order, each reported on stdout once its outputs are
    written; "pause" / "resume" on stdin hold it between units. The build ends it with a kill
    (``StaticFeatures._collect``); the end of stdin means the build is gone, and the worker
    removes the files itself."""
    # A Ctrl-C in the terminal reaches the whole process group: the build handles it and ends
    # this worker, which must not print a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # if not allowed, it simply competes
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        # Linux: run only when a core would otherwise idle (weaker than nice 19 alone, which
        # still takes a small share of a busy core).
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    units = _Units(**json.loads((folder / "meta.json").read_text()))
    units.attach({name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in _Units.INPUTS},
                 lambda name, shape, dtype: np.load(folder / f"{name}.npy", mmap_mode="r+"))
    fd, pending, paused = sys.stdin.fileno(), b"", False

    def words(block: bool) -> list[str] | None:
        """Complete words that have arrived (waiting for one if ``block``); None at EOF."""
        nonlocal pending
        if not select.select([fd], [], [], None if block else 0)[0]:
            return []
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        *lines, pending = (pending + chunk).split(b"\n")
        return [line.strip().decode() for line in lines]

    with _limit_blas():
        for i in range(len(units.units)):
            while True:
                got = words(block=paused)
                if got is None:  # the build is gone (killed): nobody else removes the files
                    shutil.rmtree(folder, ignore_errors=True)
                    return
                for word in got:
                    if word in ("pause", "resume"):
                        paused = word == "pause"
                if not paused and not got:
                    break
            units.run(i)  # outputs land in the shared pages; the report comes after them
            try:
                print(i, flush=True)
            except OSError:  # the build is gone (its end of the pipe closed)
                shutil.rmtree(folder, ignore_errors=True)
                os._exit(0)  # not return: flushing stdout again at exit would fail the same way
        while words(block=True) is not None:  # all done: wait to be collected (killed)
            pass
        shutil.rmtree(folder, ignore_errors=True)  # or for the build to be gone


# ------------------------------------------------------------------------- one-call entry points


def logit_effects(*, w_dec: Tensor, norm_scale: Tensor, w_u: Tensor, n: int = 10,
                  budget_elems: int = DEFAULT_BUDGET) -> LogitEffects:
    """Direct logit effect of each decoder direction: ``(W_dec[f] * norm_scale) @ W_U``.

    This is the first-order effect on the logits of adding the feature's direction to the
    residual stream, through the final norm's multiplicative weight (the normalisation's
    per-token 1/rms is a positive common factor, so it does not change the ranking). Top and
    bottom ``n`` tokens per feature (ties: smaller token id first); units of features hold at
    most ``budget_elems`` logits.
    """
    job = StaticFeatures(w_dec=w_dec, norm_scale=norm_scale, w_u=w_u, n_logits=n,
                         n_neighbours=0, budget_elems=budget_elems)
    return job.run().logits


def decoder_neighbours(w_dec: Tensor, *, n: int = 10, budget_elems: int = DEFAULT_BUDGET
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` other features whose decoder directions have the highest cosine similarity.

    Returns (indices int32 [d_sae, n], cosines float32 [d_sae, n]), most similar first (ties:
    smaller index first). A feature is never its own neighbour; a zero decoder row has cosine 0
    with everything. The similarity matrix is computed in square blocks of the upper triangle
    only (each block serves its rows and, transposed, its columns); each row's candidates from
    its blocks are merged exactly under the total order.
    """
    d_in = int(w_dec.shape[1])
    job = StaticFeatures(w_dec=w_dec, norm_scale=w_dec.new_ones(d_in),
                         w_u=w_dec.new_zeros(d_in, 0), n_logits=0, n_neighbours=n,
                         budget_elems=budget_elems)
    res = job.run()
    return res.neighbour_idx, res.neighbour_cos


if __name__ == "__main__":
    _worker_main(Path(sys.argv[1]))
