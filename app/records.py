"""Plain numpy records the offline pipeline hands to the store: the one contract between them,
and how their CE loss statistics read (``ce_loss_figures``) in every layer that shows them.

The pipeline (torch side) produces these; the store (no torch) writes them. Every array is numpy,
every per-feature array has length ``d_sae`` along its first axis, indexed by feature index.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WINDOW_KIND_TOP = 0
WINDOW_KIND_INTERVAL = 1
INTERVAL_FINE_BINS = 128  # the interval samples' fine grid per feature (a power of two)
# CE loss recovered = (ablated - sae) / (ablated - clean) divides by what zero-ablating the hook
# costs. Below this many nats (an MLP-out hook can cost under 0.2) a small change in the SAE's own
# cost swings the ratio widely, so it is flagged and the increase in nats is the figure to read.
CE_ABLATION_GAP_MIN_NATS = 0.5


def band_edge_bins(max_act: np.ndarray, *, n_bands: int, n_fine: int = INTERVAL_FINE_BINS
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Interval band edges as the precompute draws them, per feature: (edges in fine-bin units
    int64 [..., n_bands + 1], the grid's exponent E int64 [...]).

    A feature's fine grid has n_fine bins of width 2^E / n_fine over [0, 2^E), E the frexp
    exponent of its max M (M < 2^E). Inner edge j is the equal-width edge j * M / n_bands
    snapped to the grid (off by at most half a bin, under 1% of M with the defaults); edge 0 is
    0 and the last edge the end of the grid. The pipeline bins with these edges, and the
    explorer shows them, so a sample always lies inside the band it is listed under.
    """
    m = np.asarray(max_act, dtype=np.float64)
    exponent = np.frexp(m)[1].astype(np.int64)
    log2_fine = int(n_fine).bit_length() - 1
    m_bins = np.ldexp(m, log2_fine - exponent)
    j = np.arange(n_bands + 1, dtype=np.float64)
    edges = np.floor(j * m_bins[..., None] / n_bands + 0.5).astype(np.int64)
    edges[..., 0] = 0
    edges[..., -1] = n_fine
    return edges, exponent


def band_edge_values(max_act: float, *, n_bands: int, n_fine: int = INTERVAL_FINE_BINS
                     ) -> list[float]:
    """One feature's band edges as activation values (``band_edge_bins``); the last is M."""
    edges, exponent = band_edge_bins(np.float64(max_act), n_bands=n_bands, n_fine=n_fine)
    log2_fine = int(n_fine).bit_length() - 1
    values = np.ldexp(edges.astype(np.float64), int(exponent) - log2_fine).tolist()
    values[-1] = float(max_act)
    return values


@dataclass
class ModelRecord:
    """A language model as the explorer shows it; ``token_strings[i]`` is token id i, decoded."""

    model_id: str  # e.g. "smollm2-135m"
    source: str  # preset name, folder, .gguf path or hub id it was loaded from
    architecture: str  # "llama", "gemma3", ...
    d_model: int
    n_layers: int
    vocab_size: int
    token_strings: list[str]
    bos_token_id: int | None = None
    has_chat_template: bool = False


@dataclass
class SAERecord:
    """An SAE over one hook point of one model."""

    model_id: str
    sae_id: str  # Neuronpedia style "{layer}-{set}", e.g. "15-res-topk-4k"
    hook_name: str  # "blocks.15.hook_resid_post"
    architecture: str  # relu | topk | batchtopk | jumprelu
    d_in: int
    d_sae: int
    path: str  # folder it was loaded from
    cfg: dict[str, Any] = field(default_factory=dict)  # the SAE's config as saved
    train_metrics: dict[str, Any] | None = None  # evals.json written beside a trained SAE


def ce_loss_figures(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The CE loss figures shown wherever "CE loss recovered" is, all from one evaluation's
    ``stats`` (evals.json or a run's sae_stats); None where a figure is missing.

    ``ce_loss_increase``: nats the SAE adds over the clean model (sae - clean);
    ``ce_loss_ablation_gap``: nats zero-ablating the hook adds (ablated - clean);
    ``ce_loss_recovered_unreliable``: the gap is under CE_ABLATION_GAP_MIN_NATS.
    """
    clean, sae, ablated = (stats.get(f"ce_loss_{k}") for k in ("clean", "sae", "ablated"))
    increase = gap = None
    if clean is not None and sae is not None:
        increase = sae - clean
    if clean is not None and ablated is not None:
        gap = ablated - clean
    return {
        "ce_loss_recovered": stats.get("ce_loss_recovered"),
        "ce_loss_increase": increase,
        "ce_loss_ablation_gap": gap,
        "ce_loss_recovered_unreliable": None if gap is None else gap < CE_ABLATION_GAP_MIN_NATS,
    }


def describe_ce_loss(stats: Mapping[str, Any]) -> str:
    """One phrase for terminals: the ratio, the increase in nats, and the flag when it applies."""
    ce = ce_loss_figures(stats)
    if ce["ce_loss_recovered"] is None:
        return "CE loss recovered n/a"
    text = f"CE loss recovered {ce['ce_loss_recovered']:.3f}"
    if ce["ce_loss_increase"] is not None:
        text += f" (SAE adds {ce['ce_loss_increase']:+.3f} nats"
        if ce["ce_loss_recovered_unreliable"]:
            text += (f"; unreliable: zero-ablation adds only {ce['ce_loss_ablation_gap']:.3f} "
                     f"nats, under {CE_ABLATION_GAP_MIN_NATS}")
        text += ")"
    return text


@dataclass
class RunRecord:
    """One precompute run: what was read and the per-SAE statistics it measured."""

    corpus: str
    n_tokens: int  # tokens processed (excluding nothing; see n_tokens_counted)
    n_tokens_counted: int  # tokens that count for statistics (BOS / special tokens excluded)
    context_size: int
    window_len: int
    n_top: int  # top windows kept per feature
    n_bands: int  # interval bands per feature
    config: dict[str, Any] = field(default_factory=dict)  # everything needed to reproduce it
    # Per-SAE statistics: keys "l0_hist" {"edges","counts"}, "density_hist" {"edges","counts"}
    # (log10 of frac_nonzero), "n_dead", "n_dense", "mean_l0", "explained_variance",
    # "ce_loss_clean", "ce_loss_sae", "ce_loss_ablated", "ce_loss_recovered", ...
    sae_stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class SequenceArrays:
    """Token sequences referenced by windows; token ids are stored once per sequence.

    A packed sequence may hold several documents, each opened by a BOS (app/pipeline/corpus.py).
    ``doc_starts[i]`` lists every document sequence i holds, in order, as int32 rows
    (offset, doc_index): offset is the position where the document starts in the sequence (its
    BOS), 0 for the first, which may have begun in the sequence before; its doc_index is
    ``doc_index[i]``. None means one document per sequence, ``doc_index[i]`` at offset 0.
    """

    seq_index: np.ndarray  # int64 [n]   position of the sequence in the corpus stream
    doc_index: np.ndarray  # int64 [n]   document at position 0 (the first the sequence holds)
    tokens: np.ndarray  # int32 [n, context_size]
    doc_names: list[str] = field(default_factory=list)  # doc_names[doc_index] (all documents)
    doc_starts: list[np.ndarray] | None = None  # n arrays int32 [m_i, 2]: (offset, doc_index)

    def starts_of(self, row: int) -> np.ndarray:
        """int32 [m, 2] (offset, doc_index) of every document of row ``row``, first at 0."""
        if self.doc_starts is None:
            return np.array([[0, int(self.doc_index[row])]], dtype=np.int32)
        return np.asarray(self.doc_starts[row], dtype=np.int32).reshape(-1, 2)


def document_starts(doc_ids: np.ndarray) -> list[np.ndarray]:
    """Per row of ``doc_ids`` (int [n, ctx]: the document of each position, a BOS counted with
    the document it opens), the (offset, doc_index) rows where each document starts: position
    0, then every position whose document differs from the one before."""
    ids = np.asarray(doc_ids)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError("doc_ids must be [n_sequences, context_size]")
    if ids.shape[0] == 0:
        return []
    change = np.ones(ids.shape, dtype=bool)
    change[:, 1:] = ids[:, 1:] != ids[:, :-1]
    rows, offsets = np.nonzero(change)
    pairs = np.stack([offsets, ids[rows, offsets]], axis=1).astype(np.int32)
    return np.split(pairs, np.cumsum(change.sum(axis=1))[:-1])


@dataclass
class FeatureArrays:
    """Per-feature statistics; arrays of length d_sae along axis 0."""

    count: np.ndarray  # int64   number of counted tokens where the feature is > 0
    act_sum: np.ndarray  # float64 sum of activations
    max_act: np.ndarray  # float32 max activation (0 for dead features)
    frac_nonzero: np.ndarray  # float64 count / n_tokens_counted
    hist_edges: np.ndarray  # float64 [n_bins + 1] fixed log-spaced edges, shared by all features
    hist_counts: np.ndarray  # int64 [d_sae, n_bins]
    band_share: np.ndarray  # float32 [d_sae, n_bands] share of activation mass per interval band
    band_count: np.ndarray  # int64 [d_sae, n_bands] activations per interval band
    logit_pos_ids: np.ndarray  # int32 [d_sae, n_logits] tokens the decoder direction promotes
    logit_pos_values: np.ndarray  # float32 [d_sae, n_logits]
    logit_neg_ids: np.ndarray  # int32 [d_sae, n_logits] tokens it suppresses (most negative first)
    logit_neg_values: np.ndarray  # float32 [d_sae, n_logits]
    neighbour_idx: np.ndarray  # int32 [d_sae, n_neighbours] nearest features by decoder cosine
    neighbour_cos: np.ndarray  # float32 [d_sae, n_neighbours]


@dataclass
class WindowArrays:
    """Text windows shown on feature pages (top activations and interval samples), n windows."""

    feature: np.ndarray  # int32   feature index
    kind: np.ndarray  # int8    WINDOW_KIND_TOP | WINDOW_KIND_INTERVAL
    band: np.ndarray  # int16   interval band (0 = lowest); -1 for top windows
    rank: np.ndarray  # int16   order within (feature, kind, band), 0 first (highest max for top)
    seq_index: np.ndarray  # int64   sequence (see SequenceArrays.seq_index)
    start: np.ndarray  # int32   first token position of the window within the sequence
    length: np.ndarray  # int16   tokens in the window (<= window_len)
    max_value: np.ndarray  # float32 the feature's max activation in the window
    max_pos: np.ndarray  # int16   position of that max, relative to start
    values: np.ndarray  # float16 [n, window_len] activations over the window (padded with 0)
