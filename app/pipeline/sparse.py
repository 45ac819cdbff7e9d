"""One batch of SAE codes as sparse (token, feature, value) records, the accumulators' input.

``SparseBatch`` is made by ``sparsify`` (dense code) or ``sparse_records`` (TopK code).

Every batch is the SAE encode output for whole sequences, ``acts [n_seq, ctx, d_sae]``.
``sparsify`` leaves dense land at once: it zeroes the special (BOS) rows, which touches
only those rows, and makes two passes over the block (compare, then scan the bool mask), giving
sparse records ``(token, feature, value)`` with value > 0. A TopK SAE's code arrives sparse
(``SAE.encode_sparse``) and ``sparse_records`` makes the same records from it without any array
of width d_sae. Window values are looked up in the records. Nothing takes a top-k along the token
axis of a dense block.

Notation: a record is ``(f, t, v)``: feature f, global token position ``t = seq * ctx + pos``
(``seq`` is the sequence's index in the corpus stream), activation ``v > 0``. Only counted tokens
(not BOS or other special tokens) produce records.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from app.pipeline import exact_sum


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

    @cached_property
    def value_limbs(self) -> np.ndarray:
        """``exact_sum.pieces`` of the values (shared by the accumulators that sum them)."""
        return exact_sum.pieces(self.value)

    @cached_property
    def by_feature(self) -> np.ndarray:
        """Record order sorted by (feature, token): a stable sort by feature of records in token
        order (a radix sort on 16 bits when the features fit, else a merge sort)."""
        narrow = np.uint16 if self.d_sae <= 1 << 16 else np.int64
        return np.argsort(self.feature.astype(narrow), kind="stable")

    @cached_property
    def feature_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """(features that fire, ascending; where each one's run starts in ``by_feature``)."""
        fs = self.feature[self.by_feature]
        starts = np.flatnonzero(np.r_[True, fs[1:] != fs[:-1]]) if fs.size else fs[:0]
        return fs[starts], starts

    @cached_property
    def feature_max(self) -> np.ndarray:
        """float32 [len(feature_runs[0])]: each firing feature's largest value in the batch."""
        starts = self.feature_runs[1]
        if not starts.size:
            return np.zeros(0, dtype=np.float32)
        return np.maximum.reduceat(self.value[self.by_feature], starts)

    @cached_property
    def _feature_keys(self) -> np.ndarray:
        """``feature * n_rows + token`` in ``by_feature`` order: ascending."""
        order = self.by_feature
        return self.feature[order] * self.counted.size + self.token[order]

    def global_pos(self, token: np.ndarray) -> np.ndarray:
        """Global token position ``seq * ctx + pos`` of batch rows."""
        return self.seq_index[token // self.ctx] * self.ctx + token % self.ctx

    def windows(self, *, token: np.ndarray, feature: np.ndarray, window_len: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Windows of ``window_len`` tokens centred on each (token, feature), clipped to the
        sequence: (start int32, length int16, values float16 [n, window_len], zero padded).
        A value is the record's when (token, feature) fired, else 0 (as in the dense code,
        whose special rows are zeroed).

        A window's records are one run of the (feature, token)-sorted records, found with two
        binary searches, so the cost is the records inside windows, not n * window_len."""
        pos = token % self.ctx
        first = pos - window_len // 2
        start = np.maximum(first, 0)
        end = np.minimum(first + window_len, self.ctx)
        row0 = token - pos + start  # batch row of each window's first token
        vals = np.zeros((token.size, window_len), dtype=np.float16)
        keys = self._feature_keys
        if keys.size and token.size:
            base = feature * self.counted.size + row0
            lo = np.searchsorted(keys, base)
            count = np.searchsorted(keys, base + (end - start)) - lo
            owner = np.repeat(np.arange(token.size), count)
            run_start = np.cumsum(count) - count
            at = np.arange(owner.size) - run_start[owner] + lo[owner]  # index into the sorted
            vals[owner, keys[at] - base[owner]] = self.value[self.by_feature[at]]
        return start.astype(np.int32), (end - start).astype(np.int16), vals


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

