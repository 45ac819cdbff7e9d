"""Per-feature facts that need only weights: logit effects and nearest decoder neighbours.

Both are split into independent units of work (a band of features against the whole vocabulary;
a square block of the decoder-cosine matrix), so memory stays at one unit per thread whatever
the SAE width, and any thread may run any unit: ``StaticFeatures`` runs them on a low-priority
background thread while a build streams, then on every core for what is left (see
``StaticFeatures.start_background``). Ranking is a total order, so results do not depend on the
units, on which thread ran them or on how a kernel breaks ties: largest value first (smallest
first for the suppressed tokens), and among equal values the smaller token / feature index first
(real vocabularies hold many tokens with identical embeddings, e.g. unused ones, so exact ties
do occur).

Cost: the matrix products dominate: d_sae x d_in x vocab multiply-adds for the logit effects,
half of d_sae^2 x d_in for the neighbours (cosine similarity is symmetric, so each block of the
similarity matrix serves both its rows and, transposed, its columns). They go through numpy's
BLAS (OpenBLAS, one thread per unit), which on the reference machine (2-core AMD EPYC, AVX2)
multiplies float32 matrices about 1.8x faster than torch's build. Selection is cheap: one pass
takes the max (and one the min) of every block of ``_BLOCK`` columns, and only entries at least
as good as a row's n-th best block extreme are ordered (see ``_best``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

log = logging.getLogger(__name__)

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
    units_in_background: int = 0  # run by the background thread before finish()
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


class StaticFeatures:
    """Logit effects and decoder neighbours of one SAE as units that threads take in turn.

    ``run()`` computes everything on the calling thread(s); a build instead calls
    ``start_background()`` as soon as the weights are loaded and ``finish()`` after its stream.
    """

    def __init__(self, *, w_dec: Tensor, norm_scale: Tensor, w_u: Tensor, n_logits: int = 10,
                 n_neighbours: int = 10, budget_elems: int = DEFAULT_BUDGET) -> None:
        w = w_dec.detach().float()
        self.d_sae = int(w.shape[0])
        self.vocab = int(w_u.shape[1])
        self.n_logits = min(n_logits, self.vocab)
        self.n_nb = max(0, min(n_neighbours, self.d_sae - 1))
        # Fold the norm's scale into W_U once: [d_in, vocab] (for a tied embedding this copy is
        # the only one; the transposed view would make every unit's product strided).
        self.scaled_u = np.ascontiguousarray(
            (norm_scale.detach().float()[:, None] * w_u.detach().float()).numpy())
        self.w_dec = np.ascontiguousarray(w.numpy())
        norms = np.linalg.norm(self.w_dec, axis=1, keepdims=True)
        self.unit_dec = self.w_dec / np.maximum(norms, np.float32(1e-12))

        n, d = self.n_logits, self.d_sae
        self.logits = LogitEffects(
            pos_ids=np.zeros((d, n), np.int32), pos_values=np.zeros((d, n), np.float32),
            neg_ids=np.zeros((d, n), np.int32), neg_values=np.zeros((d, n), np.float32))
        rows = max(1, budget_elems // max(self.vocab, 1))
        self._units: list[tuple[str, int, int]] = []
        if self.n_logits:
            self._units += [("logits", a, min(a + rows, d)) for a in range(0, d, rows)]
        self.step = max(1, min(d, int(budget_elems ** 0.5)))
        if self.n_nb:
            self._units += [("neighbours", a, c) for a in range(0, d, self.step)
                            for c in range(a, d, self.step)]
        self._nb_parts: dict[int, list[np.ndarray]] = {}  # row block start -> candidate keys

        self._lock = threading.Lock()
        self._local = threading.local()
        self._next = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._blas_limit = None
        self.units_in_background = 0
        self.background_nice: int | None = None  # the background thread's nice, once started
        self._error: BaseException | None = None

    @property
    def units_total(self) -> int:
        return len(self._units)

    # one unit

    def _run_unit(self, i: int) -> None:
        kind, a, c = self._units[i]
        if kind == "logits":
            effects = self._product(self.w_dec[a:c], self.scaled_u)
            for ids, values, largest in (
                    (self.logits.pos_ids, self.logits.pos_values, True),
                    (self.logits.neg_ids, self.logits.neg_values, False)):
                v, cols = _from_keys(_best(effects, self.n_logits, largest=largest))
                ids[a:c] = cols
                values[a:c] = v if largest else -v
            return
        b, c1 = min(a + self.step, self.d_sae), min(c + self.step, self.d_sae)
        sims = self._product(self.unit_dec[a:b], self.unit_dec[c:c1].T)
        if c == a:
            np.fill_diagonal(sims, -np.inf)  # never its own neighbour
        parts = [(a, _best(sims, self.n_nb, largest=True, col0=c))]
        if c != a:
            parts.append((c, _best(sims.T, self.n_nb, largest=True, col0=a)))
        with self._lock:
            for row0, keys in parts:
                self._nb_parts.setdefault(row0, []).append(keys)

    def _product(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """x @ y into this thread's reused buffer: a fresh array this large (past glibc's
        mmap threshold) would be page-faulted in again for every unit."""
        size = x.shape[0] * y.shape[1]
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.size < size:
            buf = self._local.buf = np.empty(size, dtype=np.float32)
        return np.matmul(x, y, out=buf[:size].reshape(x.shape[0], y.shape[1]))

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= len(self._units):
                return None
            self._next += 1
            return self._next - 1

    def _work(self, *, background: bool) -> None:
        try:
            while not (background and self._stop.is_set()):
                i = self._take()
                if i is None:
                    return
                self._run_unit(i)
                if background:
                    self.units_in_background += 1
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish() on the caller
            self._error = exc
            self._stop.set()

    # scheduling

    def start_background(self) -> None:
        """Start taking units on one thread that only uses otherwise idle CPU: on Linux it runs
        at nice 19 (the thread alone; raising one's own nice needs no privilege), elsewhere it
        is not started (``finish`` then does all the work). numpy's BLAS is held to one thread
        meanwhile, so no BLAS worker runs at normal priority; the caller's torch threads are
        not touched."""
        if self._thread is not None or not sys.platform.startswith("linux"):
            return
        self._limit_blas()

        def body() -> None:
            tid = threading.get_native_id()
            try:
                os.setpriority(os.PRIO_PROCESS, tid, 19)
            except OSError as exc:  # pragma: no cover - then it simply competes
                log.debug("could not lower the static-features thread's priority: %s", exc)
            self.background_nice = os.getpriority(os.PRIO_PROCESS, tid)
            self._work(background=True)

        self._thread = threading.Thread(target=body, name="saescope-static", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread after its current unit (an abandoned build)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._unlimit_blas()

    def finish(self, threads: int | None = None) -> StaticResult:
        """Stop the background thread after its current unit, run the units left on
        ``threads`` threads (default: every core) at normal priority, one BLAS thread each, and
        return the merged result."""
        t0 = time.perf_counter()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        left = len(self._units) - self._next
        threads = max(1, min(threads or os.cpu_count() or 1, left))
        if left:
            self._limit_blas()
            self._stop.clear()
            pool = [threading.Thread(target=self._work, kwargs={"background": False},
                                     name=f"saescope-static-{i}") for i in range(threads - 1)]
            for th in pool:
                th.start()
            self._work(background=False)
            for th in pool:
                th.join()
            if self._error is not None:
                raise self._error
        self._unlimit_blas()
        t1 = time.perf_counter()
        idx, cos = self._merge_neighbours()
        return StaticResult(logits=self.logits, neighbour_idx=idx, neighbour_cos=cos,
                            units_total=len(self._units),
                            units_in_background=self.units_in_background,
                            timings={"static_finish": t1 - t0,
                                     "static_merge": time.perf_counter() - t1})

    def run(self, threads: int | None = None) -> StaticResult:
        """Everything now, on ``threads`` threads (default: every core)."""
        return self.finish(threads)

    def _merge_neighbours(self) -> tuple[np.ndarray, np.ndarray]:
        d, n = self.d_sae, self.n_nb
        idx = np.zeros((d, n), dtype=np.int32)
        cos = np.zeros((d, n), dtype=np.float32)
        for row0, parts in self._nb_parts.items():
            keys = np.concatenate(parts, axis=1)
            # Each column of a row comes from one block only, so keys are distinct.
            best = ~np.sort(~keys, axis=1)[:, :n]
            v, cols = _from_keys(best)
            idx[row0:row0 + keys.shape[0]] = cols
            cos[row0:row0 + keys.shape[0]] = v
        return idx, cos

    def _limit_blas(self) -> None:
        if self._blas_limit is None:
            from threadpoolctl import ThreadpoolController

            self._blas_limit = ThreadpoolController().limit(limits=1, user_api="blas")

    def _unlimit_blas(self) -> None:
        if self._blas_limit is not None:
            self._blas_limit.restore_original_limits()
            self._blas_limit = None


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
