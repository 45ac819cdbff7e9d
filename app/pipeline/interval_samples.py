"""Per feature, equal-width activation bands: count, mass share and a few random windows each."""

from __future__ import annotations

import numpy as np

from app.pipeline import exact_sum
from app.pipeline.array_state import ArrayState, flat_view, put_rows
from app.pipeline.sparse import SparseBatch
from app.records import (
    INTERVAL_FINE_BINS,
    WINDOW_KIND_INTERVAL,
    WindowArrays,
    band_edge_bins,
)

EMPTY_PRIORITY = np.iinfo(np.uint64).max
NO_EXPONENT = np.iinfo(np.int32).min // 2  # a feature that has not fired yet


def _group_rank(sorted_groups: np.ndarray) -> np.ndarray:
    """Rank of each element within its run of equal values (input sorted by group)."""
    return np.arange(sorted_groups.size) - np.searchsorted(sorted_groups, sorted_groups, "left")


def _priority(feature: np.ndarray, gpos: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random uint64 priority of a record (splitmix64 of feature and
    position): the same record always gets the same priority, whatever the batch order."""
    x = (gpos.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
         + feature.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)
         + np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class IntervalSamples(ArrayState):
    """Per feature: equal-width activation bands over [0, max], a few random windows per band,
    and each band's count and share of the activation mass.

    The max is only known at the end, so records are binned on a grid that can only get coarser:
    per feature an exponent ``E`` with ``running_max < 2^E`` (the frexp exponent) and
    ``n_fine`` linear bins of width ``2^E / n_fine`` over ``[0, 2^E)``. A record's fine bin is
    ``floor(v * n_fine / 2^E)``; computed with ldexp, exactly. When the running max crosses
    ``2^E`` the exponent grows by d and bin b becomes ``b >> d`` (the same value floor(v * n_fine
    / 2^(E+d)) gives directly), so the final grid depends only on the final max: per-bin counts
    and sums (``exact_sum`` limbs, integer adds) are exact and independent of batch order.

    Samples: each record gets a deterministic hash priority (``_priority``). Per (feature, sample
    bin), sample bins being ``n_sample_bins`` groups of fine bins, the state keeps the
    ``candidates`` records of smallest priority: a bottom-s sample is a uniform random sample,
    bottom-s of a union is bottom-s of the bottom-s's, so merges on coarsening are exact and the
    result does not depend on batch order or on resuming. Each candidate's window is gathered when
    it enters.

    Finalize: with the final max M and grid width w = 2^E / n_fine, band j's lower edge is
    ``w * round(j * M / (n_bands * w))``: the equal-width edge ``j * M / n_bands`` snapped to the
    grid (off by at most w/2 <= M / n_fine, i.e. under 1% of M with the defaults). Band counts
    and mass shares are then exact sums of fine bins. Each band's samples are the candidates whose
    value lies in the band, lowest priority first, up to ``per_band``; every sample lies in its
    band. Approximation: a sample bin straddling a band edge contributes only its candidates that
    fall in the band, so a band made mostly of straddling bins may get fewer than ``per_band``
    samples although it holds more records (with the defaults a band spans 1.6 to 3.2 sample bins).

    Merge (``merge``): coarsen both states to the larger exponent of each feature, add the bins,
    and keep per sample bin the bottom-s of the two candidate sets: exactly the state one pass
    over both sets of records reaches (priorities are distinct within a feature: the hash is a
    bijection of the position). ``canonical_state_dict`` lists each bin's candidates by priority,
    so equal states are equal arrays.
    """

    def __init__(self, d_sae: int, *, n_bands: int = 10, per_band: int = 3, window_len: int = 32,
                 n_fine: int = INTERVAL_FINE_BINS, n_sample_bins: int = 32,
                 candidates: int | None = None, seed: int = 0) -> None:
        for name, val in (("n_fine", n_fine), ("n_sample_bins", n_sample_bins)):
            if val & (val - 1) or val < 1:
                raise ValueError(f"{name} must be a power of two, got {val}")
        if n_sample_bins > n_fine or n_fine < 4 * n_bands:
            raise ValueError("need n_sample_bins <= n_fine and n_fine >= 4 * n_bands")
        self.d_sae, self.n_bands, self.per_band = d_sae, n_bands, per_band
        self.window_len, self.n_fine, self.n_sample_bins = window_len, n_fine, n_sample_bins
        self.log2_fine = n_fine.bit_length() - 1
        self.sample_shift = self.log2_fine - (n_sample_bins.bit_length() - 1)
        self.s = candidates or per_band
        self.seed = seed
        shape = (d_sae, n_sample_bins, self.s)
        self.exponent = np.full(d_sae, NO_EXPONENT, dtype=np.int32)
        self.bin_count = np.zeros((d_sae, n_fine), dtype=np.int64)
        self.bin_sum = exact_sum.zeros(d_sae, n_fine)  # exact sums, int64 limbs
        self.prio = np.full(shape, EMPTY_PRIORITY, dtype=np.uint64)
        self.value = np.zeros(shape, dtype=np.float32)
        self.gpos = np.zeros(shape, dtype=np.int64)
        self.start = np.zeros(shape, dtype=np.int32)
        self.length = np.zeros(shape, dtype=np.int16)
        self.values = np.zeros((*shape, window_len), dtype=np.float16)
        self._reset_limit()

    _slot_fields = ("prio", "value", "gpos", "start", "length", "values")
    _fields = ("exponent", "bin_count", "bin_sum", *_slot_fields)

    def fine_bin(self, value: np.ndarray, exponent: np.ndarray) -> np.ndarray:
        """floor(v * n_fine / 2^E), exact (a power-of-two scaling of a float is exact)."""
        b = np.floor(np.ldexp(value.astype(np.float64), self.log2_fine - exponent))
        return np.minimum(b, self.n_fine - 1).astype(np.int64)

    def update(self, batch: SparseBatch) -> None:
        f, v = batch.feature, batch.value
        if f.size == 0:
            return
        feats = batch.feature_runs[0]
        new_exp = np.frexp(batch.feature_max)[1].astype(np.int32)
        old_exp = self.exponent[feats]
        grow = (old_exp != NO_EXPONENT) & (new_exp > old_exp)
        if grow.any():
            self._coarsen(feats[grow], (new_exp - old_exp)[grow])
        self.exponent[feats] = np.maximum(old_exp, new_exp)

        fine = self.fine_bin(v, self.exponent[f])
        flat = f * self.n_fine + fine
        np.add.at(flat_view(self.bin_count), flat, 1)
        exact_sum.add(self.bin_sum, flat, limbs=batch.value_limbs)
        self._insert(batch, fine >> self.sample_shift)

    def _coarsen(self, feats: np.ndarray, shift: np.ndarray) -> None:
        """Re-bin features whose exponent grew by ``shift``: fine bin b -> b >> shift."""
        shift = np.minimum(shift, 62).astype(np.int64)[:, None]
        n = feats.size
        target = (np.arange(n)[:, None] * self.n_fine
                  + (np.arange(self.n_fine)[None, :] >> shift)).ravel()
        self.bin_count[feats] = np.bincount(
            target, weights=self.bin_count[feats].ravel().astype(np.float64),
            minlength=n * self.n_fine).reshape(n, self.n_fine).astype(np.int64)
        self.bin_sum[feats] = self._coarsened_sums(self.bin_sum[feats], shift[:, 0])
        # Samples: merged bins keep the bottom-s priorities of the union of their candidates.
        nb, s = self.n_sample_bins, self.s
        old = {name: getattr(self, name)[feats].reshape(n * nb * s, *getattr(
            self, name).shape[3:]) for name in self._slot_fields}
        row = np.repeat(np.arange(n), nb * s)
        new_bin = np.repeat(np.arange(nb)[None, :] >> shift, s, axis=1).ravel()
        group = row * nb + new_bin
        order = np.lexsort((old["prio"], group))
        rank = _group_rank(group[order])
        sel, slot = order[rank < s], rank[rank < s]
        for name in self._slot_fields:
            arr = getattr(self, name)
            fresh = np.zeros((n, nb, s, *arr.shape[3:]), dtype=arr.dtype)
            if name == "prio":
                fresh[:] = EMPTY_PRIORITY
            fresh[row[sel], new_bin[sel], slot] = old[name][sel]
            arr[feats] = fresh
        self._reset_limit(feats)

    def _coarsened_sums(self, sums: np.ndarray, shift: np.ndarray) -> np.ndarray:
        """Exact bin sums [n, n_fine, 3] re-binned b -> b >> shift: runs of 2^shift adjacent
        bins add up (integer adds of normalized limbs), one reshape per distinct shift."""
        out = np.zeros_like(sums)
        for d in np.unique(shift):
            rows = np.flatnonzero(shift == d)
            width = self.n_fine >> min(int(d), self.log2_fine)
            out[rows, :width] = sums[rows].reshape(rows.size, width, -1,
                                                   exact_sum.N_LIMBS).sum(axis=2)
        return exact_sum.normalize(out)

    def _insert(self, batch: SparseBatch, sample_bin: np.ndarray) -> None:
        """Merge records into the per-(feature, sample bin) bottom-s sets. The s slots of a set
        are unordered; a new winner takes the slot of the candidate it evicts, so only new
        winners' payload is written.

        Per set touched, the s old priorities and the s smallest new ones (no other new record
        can enter) form one row of 2s, sorted stably (an old entry before a new one on a tie):
        the first s are the set after the merge."""
        f = batch.feature
        gpos = batch.global_pos(batch.token)
        prio = _priority(f, gpos, self.seed)
        nb, s = self.n_sample_bins, self.s
        order = batch.by_feature
        idx = order[prio[order] < self._limit[f[order], sample_bin[order]]]
        if not idx.size:
            return
        # Group the entrants by (feature, sample bin); in feature order that is nearly sorted.
        group = f[idx] * nb + sample_bin[idx]
        by = np.argsort(group, kind="stable")
        idx, group = idx[by], group[by]
        first = np.r_[True, group[1:] != group[:-1]]
        run_start = np.flatnonzero(first)
        run_of = np.cumsum(first) - 1
        rank = np.arange(idx.size) - run_start[run_of]
        run_len = np.diff(np.r_[run_start, idx.size])
        if run_len.max() > s:  # sets with more than s entrants keep their s smallest priorities
            crowded = np.flatnonzero(run_len[run_of] > s)
            by = crowded[np.lexsort((prio[idx[crowded]], run_of[crowded]))]
            idx[crowded] = idx[by]  # reordered within their runs, which stay in place
            sel = rank < s
            idx, run_of, rank = idx[sel], run_of[sel], rank[sel]
        groups = group[run_start]
        g_f, g_b = groups // nb, groups % nb
        row = np.full((groups.size, 2 * s), EMPTY_PRIORITY, dtype=np.uint64)
        row[:, :s] = self.prio[g_f, g_b]
        row[run_of, s + rank] = prio[idx]
        place = np.argsort(row, axis=1, kind="stable")
        # New winners and evicted slots, each in priority order within a set: paired up.
        won, lost = place[:, :s], place[:, s:]
        new_at = np.nonzero(won >= s)
        freed = lost[lost < s]
        entrant = np.full((groups.size, s), -1, dtype=np.int64)
        entrant[run_of, rank] = idx
        rec = entrant[new_at[0], won[new_at] - s]
        rf, rb, rs = f[rec], sample_bin[rec], freed
        start, length, values = batch.windows(token=batch.token[rec], feature=rf,
                                              window_len=self.window_len)
        self.prio[rf, rb, rs] = prio[rec]
        self.value[rf, rb, rs] = batch.value[rec]
        self.gpos[rf, rb, rs] = gpos[rec]
        self.start[rf, rb, rs] = start
        self.length[rf, rb, rs] = length
        put_rows(self.values, (rf, rb, rs), values)
        self._limit[g_f, g_b] = np.take_along_axis(row, won[:, -1:], axis=1)[:, 0]

    def _reset_limit(self, feats: np.ndarray | None = None) -> None:
        """``_limit[f, b]``: the largest priority in set (f, b) (EMPTY while it has a free
        slot), below which a record enters; derived from ``prio``, for ``feats`` or all."""
        if feats is None:
            self._limit = self.prio.max(axis=2)
        else:
            self._limit[feats] = self.prio[feats].max(axis=2)

    def merge(self, other: IntervalSamples) -> None:
        """Fold in the state of other records (associative, commutative, exact); ``other`` is
        left as it was."""
        params = ("d_sae", "n_bands", "per_band", "window_len", "n_fine", "n_sample_bins", "s",
                  "seed")
        if any(getattr(self, p) != getattr(other, p) for p in params):
            raise ValueError("cannot merge interval samples of different parameters")
        other = other.copy()
        exponent = np.maximum(self.exponent, other.exponent)
        for part in (self, other):
            grow = (part.exponent != NO_EXPONENT) & (exponent > part.exponent)
            if grow.any():
                part._coarsen(np.flatnonzero(grow), (exponent - part.exponent)[grow])
            part.exponent = exponent.copy()
        self.bin_count += other.bin_count
        self.bin_sum = exact_sum.merged(self.bin_sum, other.bin_sum)
        # Per (feature, sample bin): the s smallest priorities of both candidate sets.
        prio = np.concatenate([self.prio, other.prio], axis=2)
        keep = np.argsort(prio, axis=2, kind="stable")[:, :, : self.s]
        for name in self._slot_fields:
            both = np.concatenate([getattr(self, name), getattr(other, name)], axis=2)
            index = keep.reshape(*keep.shape, *([1] * (both.ndim - 3)))
            setattr(self, name, np.take_along_axis(both, index, axis=2))
        self._reset_limit()

    def copy(self) -> IntervalSamples:
        twin = object.__new__(IntervalSamples)
        twin.__dict__.update(self.__dict__)
        for name in (*self._fields, "_limit"):
            setattr(twin, name, getattr(self, name).copy())
        return twin

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        super().load_state_dict(state)
        self._reset_limit()

    def canonical_state_dict(self) -> dict[str, np.ndarray]:
        """``state_dict`` with each bin's candidates in priority order (empty slots last): equal
        states give equal arrays, whatever order their candidates came in."""
        order = np.argsort(self.prio, axis=2, kind="stable")
        state = super().state_dict()
        for name in self._slot_fields:
            arr = state[name]
            state[name] = np.take_along_axis(arr, order.reshape(*order.shape,
                                                                *([1] * (arr.ndim - 3))), axis=2)
        return state

    def band_edges(self, max_act: np.ndarray) -> np.ndarray:
        """int64 [d_sae, n_bands + 1] band edges in fine-bin units (edge j = first fine bin of
        band j; the last edge is n_fine), as ``records.band_edge_bins`` defines them from the
        max alone (this state's exponent is the max's frexp exponent, which it checks).
        Multiply by 2^E / n_fine for activation values."""
        edges, exponent = band_edge_bins(max_act, n_bands=self.n_bands, n_fine=self.n_fine)
        fired = self.exponent != NO_EXPONENT
        if not np.array_equal(exponent[fired], self.exponent[fired]):
            raise AssertionError("interval grid exponent differs from the max's")
        edges[~fired] = 0
        edges[~fired, -1] = self.n_fine
        return edges

    def band_edge_values(self, max_act: np.ndarray) -> np.ndarray:
        """float64 [d_sae, n_bands + 1] band edges as activation values (last = +inf)."""
        edges = self.band_edges(max_act).astype(np.float64)
        vals = np.ldexp(edges, (self.exponent.astype(np.int64) - self.log2_fine)[:, None])
        vals[:, -1] = np.inf
        return vals

    def finalize(self, *, max_act: np.ndarray, ctx: int
                 ) -> tuple[np.ndarray, np.ndarray, WindowArrays]:
        """(band_count int64 [d_sae, n_bands], band_share float32 [d_sae, n_bands], windows)."""
        fired = self.exponent != NO_EXPONENT
        edges = self.band_edges(max_act)
        # band of fine bin b = number of inner edges <= b
        fine = np.arange(self.n_fine)
        band_of_bin = (fine[None, :, None] >= edges[:, None, 1:-1]).sum(axis=2)
        band_of_bin[~fired] = 0
        flat = (np.arange(self.d_sae)[:, None] * self.n_bands + band_of_bin).ravel()
        size = self.d_sae * self.n_bands
        band_count = np.bincount(flat, weights=self.bin_count.ravel().astype(np.float64),
                                 minlength=size).reshape(self.d_sae, self.n_bands).astype(np.int64)
        band_limbs = exact_sum.reduce_groups(self.bin_sum.reshape(-1, exact_sum.N_LIMBS), flat,
                                             size).reshape(self.d_sae, self.n_bands, -1)
        band_sum = exact_sum.to_float(band_limbs)
        total = exact_sum.to_float(exact_sum.normalize(band_limbs.sum(axis=1)))[:, None]
        band_share = np.divide(band_sum, total, out=np.zeros_like(band_sum), where=total > 0)

        f, b, c = np.nonzero(self.prio != EMPTY_PRIORITY)
        value = self.value[f, b, c]
        band = band_of_bin[f, self.fine_bin(value, self.exponent[f])]
        order = np.lexsort((self.prio[f, b, c], band, f))
        group = f[order] * self.n_bands + band[order]
        rank = _group_rank(group)
        sel = order[rank < self.per_band]
        rank = rank[rank < self.per_band]
        f, b, c, band = f[sel], b[sel], c[sel], band[sel]
        gpos, start = self.gpos[f, b, c], self.start[f, b, c]
        values = self.values[f, b, c]
        length = self.length[f, b, c]
        # The window's max (the sampled token need not be the max of its window).
        vals32 = values.astype(np.float32)
        max_pos = vals32.argmax(axis=1)
        windows = WindowArrays(
            feature=f.astype(np.int32), kind=np.full(f.size, WINDOW_KIND_INTERVAL, dtype=np.int8),
            band=band.astype(np.int16), rank=rank.astype(np.int16), seq_index=gpos // ctx,
            start=start, length=length, max_value=vals32[np.arange(f.size), max_pos],
            max_pos=max_pos.astype(np.int16), values=values)
        return band_count, band_share.astype(np.float32), windows

