"""Per-feature facts that need only weights: logit effects and nearest decoder neighbours.

Both are split into independent units of work (a band of features against the whole vocabulary;
a square block of the decoder-cosine matrix), so each thread holds one unit's product whatever
the SAE width, and any thread or process may run any unit. A neighbour block's candidates are
merged into its rows' running best n as the block is done (``_Units.merge_band``), so nothing
grows as d_sae^2: the outputs are O(d_sae x n) whatever the width. ``StaticFeatures`` hands
the units to a lowest-priority worker process (``idle_worker.py``) while a build streams, then
runs what is left on every core (see ``StaticFeatures.start_background``);
a sharded build sends groups of units to other machines (``run_units``) and merges the
``StaticPart`` s they return (``StaticFeatures.finish_parts``).
Ranking is a total order, so results do not depend on the units' order or on who ran them
(every unit has the same shape and one BLAS thread wherever it runs): largest value first
(smallest first for the suppressed tokens), and among equal values the smaller token / feature
index first. Equal means equal float32 products: the BLAS may round the dot products of two
identical embeddings differently by their column position, so identical tokens (real
vocabularies hold unused ones) are ordered as their computed values are.

Cost: the matrix products dominate: d_sae x d_in x vocab multiply-adds for the logit effects,
half of d_sae^2 x d_in for the neighbours (cosine similarity is symmetric, so each block of the
similarity matrix serves both its rows and, transposed, its columns). They go through numpy's
BLAS (OpenBLAS, one thread per unit), the faster of numpy's and torch's for these float32
products on the reference machine. Selection is cheap: one pass takes the max (and one the min)
of every block of ``_BLOCK`` columns, and only entries at least as good as a row's n-th best
block extreme are ordered (see ``_best``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from app.pipeline.idle_worker import IdleWorker, run_on_threads

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
class StaticPart:
    """The outputs of some units, as a process that ran them returns them: each logit-effect
    unit's rows (unit index -> its arrays), and for the neighbour units it ran (``nb_units``)
    every row's best n candidate keys among their blocks (``nb_best``, int64 [d_sae, n], padded
    with the worst key; None when it ran none). A unit's output is a function of the weights
    alone and the best n of a union of keys does not depend on how it is grouped, so ``merge``
    is associative and commutative (a unit in both parts counts once)."""

    outputs: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    nb_units: frozenset[int] = frozenset()
    nb_best: np.ndarray | None = None

    def merge(self, other: StaticPart) -> StaticPart:
        best = self.nb_best if other.nb_best is None else (
            other.nb_best if self.nb_best is None else _merge_keys(self.nb_best, other.nb_best))
        return StaticPart({**self.outputs, **other.outputs}, self.nb_units | other.nb_units, best)


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


_WORST = np.iinfo(np.int64).min  # the key of no candidate (pads rows with fewer than n)


def _merge_keys(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the best ``a.shape[1]`` distinct keys of ``a`` and ``b`` (each [r, *]), best
    first, padded with ``_WORST``. Distinct: the same candidate merged twice (a unit run again
    after its worker was killed) is one key, as it is the same (value, column)."""
    n = a.shape[1]
    keys = ~np.sort(~np.concatenate([a, b], axis=1), axis=1)  # best first
    dup = np.zeros(keys.shape, dtype=bool)
    dup[:, 1:] = keys[:, 1:] == keys[:, :-1]
    if dup.any():
        keys = ~np.sort(~np.where(dup, _WORST, keys), axis=1)
    return keys[:, :n]


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
        self.n_bands = -(-d // self.step)
        # One lock per band of rows: two threads may merge blocks of the same rows at once.
        self._band_locks = [threading.Lock() for _ in range(self.n_bands if n_nb else 0)]
        self._local = threading.local()

    @property
    def meta(self) -> dict[str, int]:
        """What the worker needs to plan the same units."""
        return {"d_sae": self.d_sae, "vocab": self.vocab, "n_logits": self.n_logits,
                "n_nb": self.n_nb, "budget_elems": self.budget_elems}

    def output_shapes(self) -> dict[str, tuple[tuple[int, ...], type]]:
        d, n = self.d_sae, self.n_logits
        return {"pos_ids": ((d, n), np.int32), "pos_values": ((d, n), np.float32),
                "neg_ids": ((d, n), np.int32), "neg_values": ((d, n), np.float32),
                # every row's best neighbour keys so far, in two copies per band of rows, and
                # per band which copy is current (0: none yet, 1 or 2); see ``merge_band``
                "nb_best": ((2, d, max(self.n_nb, 1)), np.int64),
                "nb_sel": ((max(self.n_bands, 1),), np.int64)}

    def attach(self, arrays: dict[str, np.ndarray]) -> None:
        """Use these arrays: the inputs and the outputs (``output_shapes``)."""
        self.a = arrays

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
        parts = [(a, sims, c)] if c == a else [(a, sims, c), (c, sims.T, a)]
        for row0, block, col0 in parts:
            self.merge_band(row0 // self.step, _best(block, self.n_nb, largest=True, col0=col0))

    def current_best(self, band: int) -> np.ndarray:
        """The band's rows' best neighbour keys so far ([rows, n], padded with ``_WORST``)."""
        r0, r1 = band * self.step, min((band + 1) * self.step, self.d_sae)
        sel = int(self.a["nb_sel"][band])
        if not sel:
            return np.full((r1 - r0, self.n_nb), _WORST, dtype=np.int64)
        return np.array(self.a["nb_best"][sel - 1, r0:r1])

    def merge_band(self, band: int, keys: np.ndarray) -> None:
        """Merge candidate keys ([rows, <= n]) into the band's running best n. The merged rows go
        to the band's other copy, then one 8-byte store makes that copy current: a worker killed
        mid-merge leaves the band as it was (the unit, unreported, runs again; merging the same
        keys twice changes nothing, see ``_merge_keys``)."""
        pad = np.full((keys.shape[0], self.n_nb - keys.shape[1]), _WORST, dtype=np.int64)
        with self._band_locks[band]:
            merged = _merge_keys(self.current_best(band), np.concatenate([keys, pad], axis=1))
            sel = int(self.a["nb_sel"][band])
            other = 2 if sel == 1 else 1
            r0 = band * self.step
            self.a["nb_best"][other - 1, r0:r0 + merged.shape[0]] = merged
            self.a["nb_sel"][band] = other

    def part(self, unit_ids: list[int]) -> StaticPart:
        """These units' outputs as a ``StaticPart`` (copies)."""
        outputs = {}
        nb = frozenset(i for i in unit_ids if self.units[i][0] == "neighbours")
        for i in unit_ids:
            _, a, c = self.units[i]
            if i not in nb:
                outputs[i] = {name: np.array(self.a[name][a:c])
                              for name in ("pos_ids", "pos_values", "neg_ids", "neg_values")}
        best = self.all_best() if nb else None
        return StaticPart(outputs, nb, best)

    def set_part(self, part: StaticPart) -> None:
        """Take a (merged) part's outputs as this job's."""
        for i, out in part.outputs.items():
            _, a, c = self.units[i]
            for name, arr in out.items():
                self.a[name][a:c] = arr
        if part.nb_best is not None:
            for band in range(self.n_bands):
                r0 = band * self.step
                self.a["nb_best"][0, r0:r0 + self.step] = part.nb_best[r0:r0 + self.step]
                self.a["nb_sel"][band] = 1

    def all_best(self) -> np.ndarray:
        """Every row's best neighbour keys so far, int64 [d_sae, n]."""
        return np.concatenate([self.current_best(b) for b in range(self.n_bands)]) \
            if self.n_bands else np.zeros((0, self.n_nb), dtype=np.int64)

    def merge_neighbours(self) -> tuple[np.ndarray, np.ndarray]:
        d, n = self.d_sae, self.n_nb
        if not n:
            return np.zeros((d, n), dtype=np.int32), np.zeros((d, n), dtype=np.float32)
        v, cols = _from_keys(self.all_best())
        return cols.astype(np.int32), v


def run_units(meta: dict[str, int], inputs: dict[str, np.ndarray], unit_ids: list[int], *,
              threads: int = 1) -> StaticPart:
    """Run some units (``StaticFeatures.plan``'s meta and inputs) on ``threads`` threads, one
    BLAS thread each, and return their outputs: the piece of work a sharded build sends to
    another process or machine. Output arrays are allocated zeroed (pages untouched by the
    units run here are never resident)."""
    units = _Units(**meta)
    units.attach({**inputs, **{name: np.zeros(shape, dtype) for name, (shape, dtype)
                               in units.output_shapes().items()}})
    run_on_threads(units.run, unit_ids, max(1, threads))
    return units.part(unit_ids)


def worker_units(meta: dict[str, int], arrays: dict[str, np.ndarray]) -> Callable[[int], None]:
    """The idle worker's runner: the same units over its maps of the shared arrays."""
    units = _Units(**meta)
    units.attach(arrays)
    return units.run


class StaticFeatures:
    """Logit effects and decoder neighbours of one SAE, as units of work.

    ``run()`` computes everything on the calling process's threads. A build instead calls
    ``start_background()`` as soon as the weights are loaded, which hands the units, in order,
    to an ``IdleWorker`` (a process at the lowest CPU priority), and ``finish()`` after its
    stream, which ends the worker and runs the units it did not report on every core.
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
        self._units.attach({**inputs, **{name: np.zeros(shape, dtype) for name, (shape, dtype)
                                         in self._units.output_shapes().items()}})
        self._worker: IdleWorker | None = None
        self._done: set[int] = set()  # units the worker reported complete, once it is closed

    @property
    def units_total(self) -> int:
        return len(self._units.units)

    @property
    def units_in_background(self) -> int:
        """Units the worker has reported complete (as read so far)."""
        return len(self._worker.done if self._worker is not None else self._done)

    # the background worker

    def start_background(self, *, paused: bool = False) -> None:
        """Hand the units to an ``IdleWorker`` (POSIX only; elsewhere ``finish`` does all the
        work): it runs at the lowest priority with one BLAS thread, so it only gets CPU the build
        leaves idle: while the corpus is tokenized, and the gaps of the stream. The arrays go
        through files mapped by both processes, removed by ``finish`` / ``stop``. ``paused``
        holds it before its first unit (see ``IdleWorker.step``)."""
        if self._worker is not None or os.name != "posix" or not self.units_total:
            return
        try:
            worker = IdleWorker.start(
                runner=f"{__name__}:worker_units", meta=self._units.meta,
                n_units=self.units_total, inputs=self._inputs,
                outputs=self._units.output_shapes(), paused=paused)
        except OSError as exc:
            # No room for its files, or no process: the build is only slower.
            sys.stderr.write(f"static features: no background worker ({exc}); the build "
                             "computes them after its stream\n")
            return
        units = _Units(**self._units.meta)
        units.attach({**worker.inputs, **worker.outputs})
        self._worker, self._units, self._inputs = worker, units, {}

    def background_progress(self) -> int:
        """Units the worker has completed so far (without waiting)."""
        if self._worker is not None:
            self._worker.progress()
        return self.units_in_background

    def pause_background(self, *, wait: bool = False) -> None:
        """The worker takes no new unit until ``resume_background`` (the unit in progress
        finishes; with ``wait``, return once it has): for a caller that wants every idle cycle
        for a while, such as a benchmark timing the bare model between the build's batches."""
        if self._worker is not None:
            self._worker.pause(wait=wait)

    def resume_background(self) -> None:
        if self._worker is not None:
            self._worker.resume()

    def stop(self) -> None:
        """Stop the worker (an abandoned build) and remove its files."""
        if self._worker is not None:
            self._worker.close()
            self._done = self._worker.done
            self._worker = None

    def finish(self, threads: int | None = None) -> StaticResult:
        """End the worker (see ``IdleWorker.collect``), run the units it did not do on
        ``threads`` threads (default: every core), one BLAS thread each, and return the merged
        result."""
        t0 = time.perf_counter()
        done = self._worker.collect() if self._worker is not None else self._done
        left = [i for i in range(self.units_total) if i not in done]
        if left:
            threads = max(1, min(threads or os.cpu_count() or 1, len(left)))
            run_on_threads(self._units.run, left, threads)
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

    def plan(self) -> tuple[dict[str, int], dict[str, np.ndarray]]:
        """(meta, inputs) for ``run_units`` elsewhere; only before ``start_background``."""
        if self._worker is not None or not self._inputs:
            raise RuntimeError("plan() is for a job that has no background worker")
        return self._units.meta, self._inputs

    def finish_parts(self, part: StaticPart) -> StaticResult:
        """The result from the outputs of every unit, run elsewhere (``run_units``)."""
        missing = set(range(self.units_total)) - set(part.outputs) - part.nb_units
        if missing:
            raise ValueError(f"static features: {len(missing)} units have no output")
        t0 = time.perf_counter()
        self._units.set_part(part)
        idx, cos = self._units.merge_neighbours()
        a = self._units.a
        logits = LogitEffects(**{name: np.array(a[name]) for name in
                                 ("pos_ids", "pos_values", "neg_ids", "neg_values")})
        return StaticResult(logits=logits, neighbour_idx=idx, neighbour_cos=cos,
                            units_total=self.units_total,
                            timings={"static_merge": time.perf_counter() - t0})

    def run(self, threads: int | None = None) -> StaticResult:
        """Everything now, on ``threads`` threads (default: every core)."""
        return self.finish(threads)


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
