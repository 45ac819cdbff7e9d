"""Per feature count, sum, max and activation histogram; per SAE the L0 and density summaries."""

from __future__ import annotations

from typing import Any

import numpy as np

from app.pipeline import exact_sum
from app.pipeline.array_state import ArrayState, flat_view
from app.pipeline.sparse import SparseBatch


def default_hist_edges() -> np.ndarray:
    """Activation histogram edges shared by every feature: 8 log-spaced bins per decade over
    [1e-4, 1e4]. Values below the first edge count in the first bin, values above the last edge
    in the last bin."""
    return np.logspace(-4, 4, 8 * 8 + 1)


DENSITY_EDGES = np.linspace(-8.0, 0.0, 33)  # log10(frac_nonzero), values below -8 in bin 0


class ActivationStats(ArrayState):
    """Per feature count, sum, max and activation histogram; per SAE the L0 distribution.

    Maths: ``count_f = #{t : v(f,t) > 0}``, ``sum_f = sum_t v(f,t)`` (exact: ``exact_sum``
    limbs, read as float64 by ``act_sum_float``), ``max_f = max_t v(f,t)`` (0 if never fired),
    ``frac_nonzero_f = count_f / N`` with N the counted tokens, ``hist[f, i] = #{t : edges[i] <=
    v(f,t) < edges[i+1]}`` with the first and last bins open-ended. ``L0(t) = #{f : v(f,t) >
    0}`` over counted tokens (tokens where nothing fires count as L0 = 0). A feature is dead when
    ``count_f = 0`` and dense when ``frac_nonzero_f > dense_threshold`` (default 0.1: it fires
    on more than one token in ten).

    Every field is a sum, a max or a count over records, so ``merge`` (field-wise add / max) of
    the states of any split of the records is the state of one pass over all of them.
    """

    def __init__(self, d_sae: int, *, hist_edges: np.ndarray | None = None,
                 dense_threshold: float = 0.1) -> None:
        self.d_sae = d_sae
        self.hist_edges = default_hist_edges() if hist_edges is None else np.asarray(hist_edges)
        self.n_hist = self.hist_edges.size - 1
        self.dense_threshold = dense_threshold
        self.count = np.zeros(d_sae, dtype=np.int64)
        self.act_sum = exact_sum.zeros(d_sae)
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
        exact_sum.add(self.act_sum, f, limbs=batch.value_limbs)
        feats = batch.feature_runs[0]
        self.max_act[feats] = np.maximum(self.max_act[feats], batch.feature_max)
        np.add.at(flat_view(self.hist), f * self.n_hist + self.hist_bin(v), 1)
        l0 = np.bincount(batch.token, minlength=batch.counted.size)[batch.counted]
        self.l0_counts += np.bincount(l0, minlength=self.d_sae + 1)

    def merge(self, other: ActivationStats) -> None:
        """Fold in the state of other records (associative and commutative, exact)."""
        if other.d_sae != self.d_sae or not np.array_equal(other.hist_edges, self.hist_edges):
            raise ValueError("cannot merge activation statistics of different shapes")
        for name in ("count", "hist", "l0_counts", "n_tokens", "n_counted"):
            setattr(self, name, np.asarray(getattr(self, name) + getattr(other, name)))
        self.act_sum = exact_sum.merged(self.act_sum, other.act_sum)
        self.max_act = np.maximum(self.max_act, other.max_act)

    def act_sum_float(self) -> np.ndarray:
        """float64 [d_sae] sums of activations."""
        return exact_sum.to_float(self.act_sum)

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

