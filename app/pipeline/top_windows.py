"""Per feature, the sequences where it fires hardest, each with a window around its max."""

from __future__ import annotations

import numpy as np

from app.pipeline.array_state import ArrayState, put_rows
from app.pipeline.sparse import SparseBatch
from app.records import WINDOW_KIND_TOP, WindowArrays

INT64_MAX = np.iinfo(np.int64).max


def _by_rank(cf: np.ndarray, cv: np.ndarray, ctok: np.ndarray, cg: np.ndarray, *,
             gpos_ascending: bool) -> tuple[np.ndarray, ...]:
    """Candidates (feature, value, token, global position), given in feature order, sorted by
    feature, then value descending, then position. When the positions already ascend within
    each feature (sequences fed in order), one stable sort of (feature, value bits) does it: a
    positive float32's bits order like its value."""
    if gpos_ascending:
        flipped = np.uint64(0xFFFFFFFF) - cv.view(np.uint32).astype(np.uint64)
        by = np.argsort((cf.astype(np.uint64) << np.uint64(32)) | flipped, kind="stable")
    else:
        by = np.lexsort((cg, -cv, cf))
    return cf[by], cv[by], ctok[by], cg[by]


class TopWindows(ArrayState):
    """Per feature, the ``k`` sequences where it fires hardest, with a window around the max.

    Maths: for feature f and sequence s let ``m(f, s) = max_pos v(f, s, pos)`` and ``p(f, s)`` the
    first position reaching it. The result is the k pairs with the largest ``m(f, s)``, ties
    broken by the smaller global position ``s * ctx + p(f, s)``: a total order, so the set is a
    function of the records alone, whatever the batch order. Streaming: since a sequence lies in
    one batch, ``m(f, s)`` is final when its batch is seen; the state keeps the current k best per
    feature, sorted, and a batch's candidates are merged in (top-k of a union = top-k of the union
    of top-ks). A window's activation values are gathered from the batch being processed when it
    is inserted, so no second pass is needed.

    Layout: the sort keys (``value``, ``gpos``) are kept sorted per feature with a ``slot``
    pointer into payload arrays (``start``, ``length``, ``values``) that never move: a new
    entry's payload goes into the slot of the entry it evicts, so a batch writes payload only for
    its new winners.

    Merge (``merge``): the k best of the union of two states' entries under the same total
    order, which is what one pass over both sets of records keeps (a sequence lies in one state).
    ``canonical_state_dict`` lists payload in rank order (slot = rank), so equal states are
    equal arrays.
    """

    def __init__(self, d_sae: int, *, k: int = 20, window_len: int = 32) -> None:
        self.d_sae, self.k, self.window_len = d_sae, k, window_len
        self.value = np.full((d_sae, k), -np.inf, dtype=np.float32)
        self.gpos = np.full((d_sae, k), INT64_MAX, dtype=np.int64)
        self.slot = np.tile(np.arange(k, dtype=np.int16), (d_sae, 1))
        self.start = np.zeros((d_sae, k), dtype=np.int32)
        self.length = np.zeros((d_sae, k), dtype=np.int16)
        self.values = np.zeros((d_sae, k, window_len), dtype=np.float16)

    _fields = ("value", "gpos", "slot", "start", "length", "values")

    def update(self, batch: SparseBatch) -> None:
        f, tok, v = batch.feature, batch.token, batch.value
        if f.size == 0:
            return
        # One candidate per (feature, sequence): its max, earliest position on ties. In
        # (feature, token) order a (feature, sequence) is one run: its max by reduceat, then the
        # run's first record reaching it.
        order = batch.by_feature
        fseq = f[order] * (batch.counted.size // batch.ctx) + tok[order] // batch.ctx
        vs = v[order]
        new_run = np.r_[True, fseq[1:] != fseq[:-1]]
        run_of = np.cumsum(new_run) - 1
        run_max = np.maximum.reduceat(vs, np.flatnonzero(new_run))
        at_max = np.flatnonzero(vs == run_max[run_of])
        firsts = at_max[np.r_[True, run_of[at_max[1:]] != run_of[at_max[:-1]]]]
        cand = order[firsts]
        cf, cv, ctok = f[cand], v[cand], tok[cand]
        cg = batch.global_pos(ctok)
        # Only candidates that beat the current k-th can enter (keys are sorted).
        worst_v, worst_g = self.value[cf, -1], self.gpos[cf, -1]
        keep = (cv > worst_v) | ((cv == worst_v) & (cg < worst_g))
        if not keep.any():
            return
        cf, cv, ctok, cg = cf[keep], cv[keep], ctok[keep], cg[keep]
        # Merge without sorting the k old entries again: a candidate's new rank is the number
        # of old entries that beat it plus the number of the feature's candidates that beat it;
        # the old entries fill the remaining places in their order.
        cf, cv, ctok, cg = _by_rank(cf, cv, ctok, cg, gpos_ascending=bool(
            np.all(np.diff(batch.seq_index) > 0)))
        row_start = np.flatnonzero(np.r_[True, cf[1:] != cf[:-1]])
        feats = cf[row_start]
        row = np.repeat(np.arange(feats.size), np.diff(np.r_[row_start, cf.size]))
        k = self.k
        old_v, old_g = self.value[feats], self.gpos[feats]
        beats_cand = (old_v[row] > cv[:, None]) | ((old_v[row] == cv[:, None])
                                                   & (old_g[row] < cg[:, None]))
        rank_c = beats_cand.sum(axis=1) + (np.arange(cf.size) - row_start[row])
        width = k + int(np.diff(np.r_[row_start, cf.size]).max())
        taken = np.zeros((feats.size, width), dtype=bool)
        taken[row, rank_c] = True
        free = ~taken
        old_place = (free & (np.cumsum(free, axis=1) <= k)).nonzero()[1].reshape(feats.size, k)
        kept_old = old_place < k
        win_c = rank_c < k
        old_slot = self.slot[feats]
        slots_c = old_slot[~kept_old]  # evicted slots, row by row, as many as new winners
        new_v = np.empty((feats.size, width), dtype=np.float32)
        new_g = np.empty((feats.size, width), dtype=np.int64)
        new_s = np.empty((feats.size, width), dtype=np.int16)
        rows_k = np.repeat(np.arange(feats.size), k).reshape(feats.size, k)
        new_v[rows_k, old_place], new_g[rows_k, old_place] = old_v, old_g
        new_s[rows_k, old_place] = old_slot
        new_v[row, rank_c], new_g[row, rank_c] = cv, cg
        new_s[row[win_c], rank_c[win_c]] = slots_c
        self.value[feats], self.gpos[feats] = new_v[:, :k], new_g[:, :k]
        self.slot[feats] = new_s[:, :k]
        nf, ns, ntok = cf[win_c], slots_c, ctok[win_c]
        start, length, values = batch.windows(token=ntok, feature=nf,
                                              window_len=self.window_len)
        self.start[nf, ns] = start
        self.length[nf, ns] = length
        put_rows(self.values, (nf, ns), values)

    def merge(self, other: TopWindows) -> None:
        """Fold in the state of other records (associative, commutative, exact)."""
        if (other.d_sae, other.k, other.window_len) != (self.d_sae, self.k, self.window_len):
            raise ValueError("cannot merge top windows of different shapes")
        a, b = self.canonical_state_dict(), other.canonical_state_dict()  # slot = rank
        value = np.concatenate([a["value"], b["value"]], axis=1)
        gpos = np.concatenate([a["gpos"], b["gpos"]], axis=1)
        best = np.lexsort((gpos, -value), axis=1)[:, : self.k]  # value desc, then gpos asc
        for name in ("value", "gpos", "start", "length", "values"):
            both = np.concatenate([a[name], b[name]], axis=1)
            index = best.reshape(*best.shape, *([1] * (both.ndim - 2)))
            setattr(self, name, np.take_along_axis(both, index, axis=1))
        self.slot = np.tile(np.arange(self.k, dtype=np.int16), (self.d_sae, 1))

    def canonical_state_dict(self) -> dict[str, np.ndarray]:
        """``state_dict`` with the payload in rank order (``slot`` = rank): equal states give
        equal arrays, whatever slots their entries took."""
        rows = np.arange(self.d_sae)[:, None]
        return {"value": self.value, "gpos": self.gpos,
                "slot": np.tile(np.arange(self.k, dtype=np.int16), (self.d_sae, 1)),
                "start": self.start[rows, self.slot], "length": self.length[rows, self.slot],
                "values": self.values[rows, self.slot]}

    def finalize(self, *, ctx: int) -> WindowArrays:
        f, rank = np.nonzero(np.isfinite(self.value))
        gpos = self.gpos[f, rank]
        slot = self.slot[f, rank]
        start = self.start[f, slot]
        return WindowArrays(
            feature=f.astype(np.int32), kind=np.full(f.size, WINDOW_KIND_TOP, dtype=np.int8),
            band=np.full(f.size, -1, dtype=np.int16), rank=rank.astype(np.int16),
            seq_index=gpos // ctx, start=start, length=self.length[f, slot],
            max_value=self.value[f, rank], max_pos=(gpos % ctx - start).astype(np.int16),
            values=self.values[f, slot])

