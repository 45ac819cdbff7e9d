"""Streaming per-feature statistics over SAE activations: update() per batch, finalize() once.

``FeatureAccumulators`` turns each batch into sparse records (``sparse.py``) and feeds them to
the top windows (``top_windows.py``), the interval samples (``interval_samples.py``) and the
activation statistics (``activation_stats.py``).

State is O(d_sae x k), independent of the corpus length. It is plain numpy (``state_dict`` /
``load_state_dict``) so the pipeline can checkpoint it and resume bit for bit, and mergeable:
``merge`` folds in the state of other records (a shard of the corpus) and is associative and
commutative, so any split of the sequences, merged in any order, gives the state of one pass
(sums are exact, see ``exact_sum.py``; ``canonical_state_dict`` orders slots, so equal states
are equal arrays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.pipeline.activation_stats import ActivationStats
from app.pipeline.interval_samples import IntervalSamples
from app.pipeline.sparse import SparseBatch, sparse_records, sparsify
from app.pipeline.top_windows import TopWindows
from app.records import WindowArrays


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

    def merge(self, other: FeatureAccumulators) -> None:
        """Fold in the accumulators of other sequences (exact; see the module docstring)."""
        if (other.d_sae, other.ctx) != (self.d_sae, self.ctx):
            raise ValueError("cannot merge accumulators of different shapes")
        self.stats.merge(other.stats)
        self.top.merge(other.top)
        self.intervals.merge(other.intervals)

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {}
        for prefix, part in (("top", self.top), ("iv", self.intervals), ("st", self.stats)):
            state.update({f"{prefix}.{k}": v for k, v in part.state_dict().items()})
        return state

    def canonical_state_dict(self) -> dict[str, np.ndarray]:
        """``state_dict`` with every part's slots in a canonical order (see the parts)."""
        state = self.state_dict()
        for prefix, part in (("top", self.top), ("iv", self.intervals)):
            state.update({f"{prefix}.{k}": v for k, v in part.canonical_state_dict().items()})
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
            count=self.stats.count.copy(), act_sum=self.stats.act_sum_float(), max_act=max_act,
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
