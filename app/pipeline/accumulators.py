"""Streaming per-feature statistics over SAE activations: update() per batch, finalize() once.

Every batch is the SAE encode output for whole sequences, ``acts [n_seq, ctx, d_sae]``.
``sparsify`` leaves dense land at once: it zeroes the special (BOS / padding) rows, which touches
only those rows, and makes two passes over the block (compare, then scan the bool mask), giving
sparse records ``(token, feature, value)`` with value > 0. A TopK SAE's code arrives sparse
(``SAE.encode_sparse``) and ``sparse_records`` makes the same records from it without any array
of width d_sae. All accumulators then work on those records; window values are looked up in them.
Nothing takes a top-k along the token axis of a dense block.

State is O(d_sae x k), independent of the corpus length. It is plain numpy (``state_dict`` /
``load_state_dict``) so the pipeline can checkpoint it and resume bit for bit.

Notation: a record is ``(f, t, v)``: feature f, global token position ``t = seq * ctx + pos``
(``seq`` is the sequence's index in the corpus stream), activation ``v > 0``. Only counted tokens
(not BOS, padding or other special tokens) produce records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.records import (
    INTERVAL_FINE_BINS,
    WINDOW_KIND_INTERVAL,
    WINDOW_KIND_TOP,
    WindowArrays,
    band_edge_bins,
)

EMPTY_PRIORITY = np.iinfo(np.uint64).max
NO_EXPONENT = np.iinfo(np.int32).min // 2  # a feature that has not fired yet
INT64_MAX = np.iinfo(np.int64).max


# ----------------------------------------------------------------------------------- the batch


@dataclass
class SparseBatch:
    """One batch as sparse records, sorted by (token, feature): everything the accumulators
    read, window values included (looked up in the records, so no dense block is kept)."""

    token: np.ndarray  # int64 [n] row in the batch block: seq_local * ctx + pos
    feature: np.ndarray  # int64 [n]
    value: np.ndarray  # float32 [n], > 0
    seq_index: np.ndarray  # int64 [n_seq] global index of each sequence of the batch
    counted: np.ndarray  # bool [n_seq * ctx] tokens that count for statistics
    ctx: int
    d_sae: int

    @property
    def n_counted(self) -> int:
        return int(self.counted.sum())

    @property
    def key(self) -> np.ndarray:
        """``token * d_sae + feature``, ascending (the records' order)."""
        return self.token * self.d_sae + self.feature

    def global_pos(self, token: np.ndarray) -> np.ndarray:
        """Global token position ``seq * ctx + pos`` of batch rows."""
        return self.seq_index[token // self.ctx] * self.ctx + token % self.ctx

    def windows(self, *, token: np.ndarray, feature: np.ndarray, window_len: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Windows of ``window_len`` tokens centred on each (token, feature), clipped to the
        sequence: (start int32, length int16, values float16 [n, window_len], zero padded).
        A value is the record's when (token, feature) fired, else 0 (as in the dense code,
        whose special rows are zeroed)."""
        pos = token % self.ctx
        first = pos - window_len // 2
        start = np.maximum(first, 0)
        end = np.minimum(first + window_len, self.ctx)
        length = end - start
        offsets = np.arange(window_len)
        cols = np.minimum(start[:, None] + offsets, self.ctx - 1)
        want = ((token - pos)[:, None] + cols) * self.d_sae + feature[:, None]
        vals = np.zeros(want.shape, dtype=np.float32)
        key = self.key
        if key.size:
            at = np.minimum(np.searchsorted(key, want), key.size - 1)
            hit = key[at] == want
            vals[hit] = self.value[at[hit]]
        vals[offsets[None, :] >= length[:, None]] = 0.0
        return start.astype(np.int32), length.astype(np.int16), vals.astype(np.float16)


def sparsify(acts: torch.Tensor, *, special_mask: np.ndarray | torch.Tensor,
             seq_index: np.ndarray) -> SparseBatch:
    """Records of a dense encode output [n_seq, ctx, d_sae] (special rows are zeroed in place).

    Passes over the dense block: two (a ``> 0`` comparison, then a scan of the bool mask); the
    special rows and the gather of values at the nonzero coordinates are sparse.
    """
    n_seq, ctx, d_sae = acts.shape
    dense = acts.detach().reshape(n_seq * ctx, d_sae)
    if dense.dtype != torch.float32:
        dense = dense.float()
    special = np.asarray(special_mask, dtype=bool).reshape(-1)
    special_rows = np.flatnonzero(special)
    if special_rows.size:
        dense[torch.from_numpy(special_rows)] = 0.0
    # Pass 1 compares (multi-threaded), pass 2 scans the 4x smaller bool mask; only values
    # > 0 "fire" (an SAE whose encode can go negative is read the same way).
    flat = np.flatnonzero((dense > 0).numpy())
    vals = dense.reshape(-1).take(torch.from_numpy(flat)).numpy()
    return SparseBatch(token=flat // d_sae, feature=flat % d_sae, value=vals,
                       seq_index=np.asarray(seq_index, dtype=np.int64), counted=~special,
                       ctx=ctx, d_sae=d_sae)


def sparse_records(values: torch.Tensor, indices: torch.Tensor, *, ctx: int, d_sae: int,
                   special_mask: np.ndarray | torch.Tensor, seq_index: np.ndarray
                   ) -> SparseBatch:
    """Records of a sparse code (``SAE.encode_sparse``: values and latent indices, [n_seq *
    ctx, m] or [n_seq, ctx, m]); the same records, in the same order, as ``sparsify`` of the
    dense code. Nothing of size d_sae is touched."""
    m = values.shape[-1]
    vals = values.detach().reshape(-1, m).float().numpy()
    idx = indices.reshape(-1, m).numpy().astype(np.int64, copy=False)
    special = np.asarray(special_mask, dtype=bool).reshape(-1)
    if vals.shape[0] != special.size:
        raise ValueError(f"code has {vals.shape[0]} rows, special mask {special.size}")
    order = np.argsort(idx, axis=1, kind="stable")  # each row's latents ascending
    idx = np.take_along_axis(idx, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    fire = vals > 0
    fire[special] = False
    row, col = np.nonzero(fire)
    return SparseBatch(token=row.astype(np.int64), feature=idx[row, col], value=vals[row, col],
                       seq_index=np.asarray(seq_index, dtype=np.int64), counted=~special,
                       ctx=ctx, d_sae=d_sae)


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


# -------------------------------------------------------------------------------- top windows


class _ArrayState:
    """Checkpointing for accumulators whose whole state is the numpy arrays named in _fields."""

    _fields: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self._fields}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for name in self._fields:
            got, want = state[name], getattr(self, name)
            if got.shape != want.shape or got.dtype != want.dtype:
                raise ValueError(f"checkpoint field {name}: {got.dtype}{got.shape}, "
                                 f"expected {want.dtype}{want.shape}")
            setattr(self, name, np.array(got))


class TopWindows(_ArrayState):
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
        # One candidate per (feature, sequence): its max, earliest position on ties (records
        # come in token order and lexsort is stable).
        fseq = f * (batch.counted.size // batch.ctx) + tok // batch.ctx
        order = np.lexsort((-v, fseq))
        sorted_key = fseq[order]
        first = np.ones(order.size, dtype=bool)
        first[1:] = sorted_key[1:] != sorted_key[:-1]
        cand = order[first]
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
        by = np.lexsort((cg, -cv, cf))
        cf, cv, ctok, cg = cf[by], cv[by], ctok[by], cg[by]
        feats, row_start = np.unique(cf, return_index=True)
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
        self.values[nf, ns] = values

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


# ---------------------------------------------------------------------------- interval samples


class IntervalSamples(_ArrayState):
    """Per feature: equal-width activation bands over [0, max], a few random windows per band,
    and each band's count and share of the activation mass.

    The max is only known at the end, so records are binned on a grid that can only get coarser:
    per feature an exponent ``E`` with ``running_max < 2^E`` (the frexp exponent) and
    ``n_fine`` linear bins of width ``2^E / n_fine`` over ``[0, 2^E)``. A record's fine bin is
    ``floor(v * n_fine / 2^E)``; computed with ldexp, exactly. When the running max crosses
    ``2^E`` the exponent grows by d and bin b becomes ``b >> d`` (the same value floor(v * n_fine
    / 2^(E+d)) gives directly), so the final grid depends only on the final max: per-bin counts
    and sums are exact and independent of batch order.

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
        self.bin_sum = np.zeros((d_sae, n_fine), dtype=np.float64)
        self.prio = np.full(shape, EMPTY_PRIORITY, dtype=np.uint64)
        self.value = np.zeros(shape, dtype=np.float32)
        self.gpos = np.zeros(shape, dtype=np.int64)
        self.start = np.zeros(shape, dtype=np.int32)
        self.length = np.zeros(shape, dtype=np.int16)
        self.values = np.zeros((*shape, window_len), dtype=np.float16)

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
        order = np.argsort(f, kind="stable")
        fs = f[order]
        starts = np.flatnonzero(np.r_[True, fs[1:] != fs[:-1]])
        feats = fs[starts]
        batch_max = np.maximum.reduceat(v[order], starts)
        new_exp = np.frexp(batch_max)[1].astype(np.int32)
        old_exp = self.exponent[feats]
        grow = (old_exp != NO_EXPONENT) & (new_exp > old_exp)
        if grow.any():
            self._coarsen(feats[grow], (new_exp - old_exp)[grow])
        self.exponent[feats] = np.maximum(old_exp, new_exp)

        fine = self.fine_bin(v, self.exponent[f])
        flat = f * self.n_fine + fine
        size = self.d_sae * self.n_fine
        self.bin_count += np.bincount(flat, minlength=size).reshape(self.d_sae, self.n_fine)
        self.bin_sum += np.bincount(flat, weights=v.astype(np.float64),
                                    minlength=size).reshape(self.d_sae, self.n_fine)
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
        self.bin_sum[feats] = np.bincount(
            target, weights=self.bin_sum[feats].ravel(), minlength=n * self.n_fine
        ).reshape(n, self.n_fine)
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

    def _insert(self, batch: SparseBatch, sample_bin: np.ndarray) -> None:
        """Merge records into the per-(feature, sample bin) bottom-s sets. The s slots of a set
        are unordered; a new winner takes the slot of the candidate it evicts, so only new
        winners' payload is written."""
        f = batch.feature
        gpos = batch.global_pos(batch.token)
        prio = _priority(f, gpos, self.seed)
        keep = prio < self.prio[f, sample_bin].max(axis=1)
        if not keep.any():
            return
        idx = np.flatnonzero(keep)
        nb, s = self.n_sample_bins, self.s
        group = f[idx] * nb + sample_bin[idx]
        groups = np.unique(group)
        n_old = groups.size * s
        g_f, g_b = groups // nb, groups % nb
        all_group = np.concatenate([np.repeat(groups, s), group])
        all_prio = np.concatenate([self.prio[g_f, g_b].ravel(), prio[idx]])
        order = np.lexsort((all_prio, all_group))
        rank = _group_rank(all_group[order])
        win = order[rank < s]
        lost = order[rank >= s]
        freed = lost[lost < n_old]  # evicted old candidates, grouped like the new winners
        new = win[win >= n_old]
        rec = idx[new - n_old]
        rf, rb, rs = f[rec], sample_bin[rec], freed % s
        start, length, values = batch.windows(token=batch.token[rec], feature=rf,
                                              window_len=self.window_len)
        self.prio[rf, rb, rs] = prio[rec]
        self.value[rf, rb, rs] = batch.value[rec]
        self.gpos[rf, rb, rs] = gpos[rec]
        self.start[rf, rb, rs] = start
        self.length[rf, rb, rs] = length
        self.values[rf, rb, rs] = values

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
        band_sum = np.bincount(flat, weights=self.bin_sum.ravel(),
                               minlength=size).reshape(self.d_sae, self.n_bands)
        total = band_sum.sum(axis=1, keepdims=True)
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


# ------------------------------------------------------------------------ counts and histograms


def default_hist_edges() -> np.ndarray:
    """Activation histogram edges shared by every feature: 8 log-spaced bins per decade over
    [1e-4, 1e4]. Values below the first edge count in the first bin, values above the last edge
    in the last bin."""
    return np.logspace(-4, 4, 8 * 8 + 1)


DENSITY_EDGES = np.linspace(-8.0, 0.0, 33)  # log10(frac_nonzero), values below -8 in bin 0


class ActivationStats(_ArrayState):
    """Per feature count, sum, max and activation histogram; per SAE the L0 distribution.

    Maths: ``count_f = #{t : v(f,t) > 0}``, ``sum_f = sum_t v(f,t)`` (float64, accumulated in a
    fixed order), ``max_f = max_t v(f,t)`` (0 if never fired), ``frac_nonzero_f = count_f / N``
    with N the counted tokens, ``hist[f, i] = #{t : edges[i] <= v(f,t) < edges[i+1]}`` with the
    first and last bins open-ended. ``L0(t) = #{f : v(f,t) > 0}`` over counted tokens (tokens
    where nothing fires count as L0 = 0). A feature is dead when ``count_f = 0`` and dense when
    ``frac_nonzero_f > dense_threshold`` (default 0.1: it fires on more than one token in ten).
    """

    def __init__(self, d_sae: int, *, hist_edges: np.ndarray | None = None,
                 dense_threshold: float = 0.1) -> None:
        self.d_sae = d_sae
        self.hist_edges = default_hist_edges() if hist_edges is None else np.asarray(hist_edges)
        self.n_hist = self.hist_edges.size - 1
        self.dense_threshold = dense_threshold
        self.count = np.zeros(d_sae, dtype=np.int64)
        self.act_sum = np.zeros(d_sae, dtype=np.float64)
        self.max_act = np.zeros(d_sae, dtype=np.float32)
        self.hist = np.zeros((d_sae, self.n_hist), dtype=np.int64)
        self.l0_counts = np.zeros(d_sae + 1, dtype=np.int64)
        self.n_tokens = np.zeros((), dtype=np.int64)
        self.n_counted = np.zeros((), dtype=np.int64)

    _fields = ("count", "act_sum", "max_act", "hist", "l0_counts", "n_tokens", "n_counted")

    def hist_bin(self, value: np.ndarray) -> np.ndarray:
        b = np.searchsorted(self.hist_edges, value.astype(np.float64), side="right") - 1
        return np.clip(b, 0, self.n_hist - 1)

    def update(self, batch: SparseBatch) -> None:
        f, v = batch.feature, batch.value
        self.n_tokens += batch.counted.size
        self.n_counted += batch.n_counted
        self.count += np.bincount(f, minlength=self.d_sae)
        self.act_sum += np.bincount(f, weights=v.astype(np.float64), minlength=self.d_sae)
        if f.size:
            np.maximum.at(self.max_act, f, v)
        self.hist += np.bincount(f * self.n_hist + self.hist_bin(v),
                                 minlength=self.d_sae * self.n_hist).reshape(self.d_sae, -1)
        l0 = np.bincount(batch.token, minlength=batch.counted.size)[batch.counted]
        self.l0_counts += np.bincount(l0, minlength=self.d_sae + 1)

    def frac_nonzero(self) -> np.ndarray:
        n = max(int(self.n_counted), 1)
        return self.count / n

    def sae_stats(self) -> dict[str, Any]:
        """Per-SAE summary: L0 and density histograms, dead and dense counts, mean L0."""
        n = int(self.n_counted)
        levels = np.nonzero(self.l0_counts)[0]
        top = int(levels[-1]) if levels.size else 0
        width = max(1, -(-(top + 1) // 64))  # at most 64 integer-aligned bins
        edges = np.arange(0, top + width + 1, width)
        l0_hist = np.add.reduceat(self.l0_counts[: edges[-1]], edges[:-1]) if n else \
            np.zeros(edges.size - 1, dtype=np.int64)
        frac = self.frac_nonzero()
        alive = self.count > 0
        log_frac = np.log10(frac[alive])
        dbin = np.clip(np.searchsorted(DENSITY_EDGES, log_frac, side="right") - 1, 0,
                       DENSITY_EDGES.size - 2)
        density = np.bincount(dbin, minlength=DENSITY_EDGES.size - 1)
        mean_l0 = float((np.arange(self.d_sae + 1) * self.l0_counts).sum() / n) if n else 0.0
        return {
            "l0_hist": {"edges": edges.tolist(), "counts": l0_hist.astype(int).tolist()},
            "density_hist": {"edges": DENSITY_EDGES.tolist(), "counts": density.tolist()},
            "n_dead": int((~alive).sum()),
            "n_dense": int((frac > self.dense_threshold).sum()),
            "dense_threshold": self.dense_threshold,
            "mean_l0": mean_l0,
        }


# --------------------------------------------------------------------------------- all together


@dataclass
class FeatureStatsResult:
    """What ``FeatureAccumulators.finalize`` returns (static features are added separately)."""

    count: np.ndarray
    act_sum: np.ndarray
    max_act: np.ndarray
    frac_nonzero: np.ndarray
    hist_edges: np.ndarray
    hist_counts: np.ndarray
    band_count: np.ndarray
    band_share: np.ndarray
    windows: WindowArrays  # top windows then interval samples
    n_tokens: int
    n_tokens_counted: int
    sae_stats: dict[str, Any]


class FeatureAccumulators:
    """Top windows, interval samples and activation statistics, fed from one encode output."""

    def __init__(self, d_sae: int, *, ctx: int, n_top: int = 20, window_len: int = 32,
                 n_bands: int = 10, per_band: int = 3, seed: int = 0,
                 dense_threshold: float = 0.1) -> None:
        self.d_sae, self.ctx = d_sae, ctx
        self.top = TopWindows(d_sae, k=n_top, window_len=window_len)
        self.intervals = IntervalSamples(d_sae, n_bands=n_bands, per_band=per_band,
                                         window_len=window_len, seed=seed)
        self.stats = ActivationStats(d_sae, dense_threshold=dense_threshold)

    def update(self, acts: torch.Tensor, *, special_mask: np.ndarray,
               seq_index: np.ndarray) -> SparseBatch:
        """Feed one encode output [n_seq, ctx, d_sae] of whole sequences ``seq_index``.

        Special rows of ``acts`` are zeroed in place."""
        if acts.shape[1] != self.ctx or acts.shape[2] != self.d_sae:
            raise ValueError(f"expected [*, {self.ctx}, {self.d_sae}], got {tuple(acts.shape)}")
        return self.feed(sparsify(acts, special_mask=special_mask, seq_index=seq_index))

    def update_sparse(self, values: torch.Tensor, indices: torch.Tensor, *,
                      special_mask: np.ndarray, seq_index: np.ndarray) -> SparseBatch:
        """Feed one sparse code (``SAE.encode_sparse`` of whole sequences ``seq_index``); the
        same result as ``update`` with its dense form."""
        return self.feed(sparse_records(values, indices, ctx=self.ctx, d_sae=self.d_sae,
                                        special_mask=special_mask, seq_index=seq_index))

    def feed(self, batch: SparseBatch) -> SparseBatch:
        self.stats.update(batch)
        self.top.update(batch)
        self.intervals.update(batch)
        return batch

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {}
        for prefix, part in (("top", self.top), ("iv", self.intervals), ("st", self.stats)):
            state.update({f"{prefix}.{k}": v for k, v in part.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for prefix, part in (("top", self.top), ("iv", self.intervals), ("st", self.stats)):
            part.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                  if k.startswith(prefix + ".")})

    def finalize(self) -> FeatureStatsResult:
        max_act = self.stats.max_act.copy()
        band_count, band_share, iv_windows = self.intervals.finalize(max_act=max_act,
                                                                      ctx=self.ctx)
        windows = concat_windows([self.top.finalize(ctx=self.ctx), iv_windows])
        return FeatureStatsResult(
            count=self.stats.count.copy(), act_sum=self.stats.act_sum.copy(), max_act=max_act,
            frac_nonzero=self.stats.frac_nonzero(), hist_edges=self.stats.hist_edges.copy(),
            hist_counts=self.stats.hist.copy(), band_count=band_count, band_share=band_share,
            windows=windows, n_tokens=int(self.stats.n_tokens),
            n_tokens_counted=int(self.stats.n_counted), sae_stats=self.stats.sae_stats())


def concat_windows(parts: list[WindowArrays]) -> WindowArrays:
    """Concatenate window arrays, sorted by (feature, kind, band, rank)."""
    cols = {name: np.concatenate([getattr(p, name) for p in parts])
            for name in WindowArrays.__dataclass_fields__}
    order = np.lexsort((cols["rank"], cols["band"], cols["kind"], cols["feature"]))
    return WindowArrays(**{name: arr[order] for name, arr in cols.items()})
