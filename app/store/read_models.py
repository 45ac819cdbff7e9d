"""Read models: the plain, frozen records the store's queries return to the API and pages."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np

# A feature firing on more than this fraction of tokens counts as dense (SAELens' dashboards and
# Neuronpedia use the same 10% line), unless the run recorded its own threshold.
DEFAULT_DENSE_THRESHOLD = 0.1


@dataclass(frozen=True)
class ModelInfo:
    id: str
    source: str
    architecture: str
    d_model: int
    n_layers: int
    vocab_size: int
    bos_token_id: int | None
    has_chat_template: bool
    sae_ids: list[str]


@dataclass(frozen=True)
class RunInfo:
    id: int
    corpus: str
    n_tokens: int
    n_tokens_counted: int
    context_size: int
    window_len: int
    n_top: int
    n_bands: int
    config: dict[str, Any]
    sae_stats: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class SAEInfo:
    id: str
    model_id: str
    hook_name: str
    architecture: str
    d_in: int
    d_sae: int
    path: str
    cfg: dict[str, Any]
    train_metrics: dict[str, Any] | None
    run: RunInfo | None
    n_labeled: int


@dataclass(frozen=True)
class SAEBrief:
    """The few SAE columns hot paths check first (no JSON columns to decode)."""

    id: str
    model_id: str
    d_sae: int
    path: str
    active_run_id: int | None


@dataclass(frozen=True)
class LabelInfo:
    """One author's label of one feature."""

    description: str
    tags: list[str]
    status: str
    author: str
    version: int
    updated_at: datetime
    id: int = 0
    sae_id: str = ""
    feature_index: int = -1
    author_kind: str = "person"
    confidence: float | None = None
    notes: str = ""
    reviewed_by: str | None = None
    created_at: datetime | None = None


@dataclass(frozen=True)
class RevisionInfo:
    """One change of a label: `before`/`after` hold its fields (None before a create and after
    a withdraw)."""

    id: int
    label_id: int
    version: int
    sae_id: str
    feature_index: int
    action: str
    actor: str
    created_at: datetime
    before: dict[str, Any] | None
    after: dict[str, Any] | None


@dataclass(frozen=True)
class ScoreInfo:
    """One score of one label version: detection or fuzzing balanced accuracy by one scorer, with
    the random-explanation control measured on the same windows."""

    label_id: int
    label_version: int
    method: str
    scorer: str
    score: float | None
    control_score: float | None
    n_windows: int
    seed: int
    run_id: int | None
    created_at: datetime
    details: dict[str, Any]


@dataclass(frozen=True)
class LabelHit:
    """A label search result; `score` is larger for better matches."""

    label: LabelInfo
    score: float


@dataclass(frozen=True)
class FeatureRow:
    """One row of the feature table."""

    index: int
    count: int
    frac_nonzero: float
    max_act: float
    mean_act: float
    label: LabelInfo | None
    top_tokens: list[str]


@dataclass(frozen=True)
class FeaturePage:
    items: list[FeatureRow]
    total: int
    page: int
    per_page: int


@dataclass(frozen=True)
class Band:
    band: int
    lo: float
    hi: float
    share: float
    count: int


@dataclass(frozen=True, slots=True)
class WindowDocument:
    """A document a window shows: from token `offset` of the window on (a later one starts at
    its BOS; the first, at 0, may have begun before the window)."""

    offset: int
    doc_index: int
    name: str | None


# Not frozen: a feature read builds dozens of these, and a frozen dataclass's init is slower.
@dataclass(slots=True)
class WindowInfo:
    kind: Literal["top", "interval"]
    band: int
    rank: int
    token_ids: list[int]
    tokens: list[str]
    values: list[float]
    max_value: float
    max_pos: int
    seq_index: int
    start: int
    doc_name: str | None  # the document at the window's first token
    # The stored float16 values themselves, for renderers that work on arrays (not compared).
    values_f16: np.ndarray | None = field(default=None, compare=False, repr=False)
    # Every document the window shows, in order; more than one where it crosses a boundary.
    documents: tuple[WindowDocument, ...] = ()


@dataclass(frozen=True)
class TokenValue:
    token_id: int
    token: str
    value: float


@dataclass(frozen=True)
class FeatureDetail:
    sae_id: str
    model_id: str
    index: int
    d_sae: int
    count: int
    act_sum: float
    mean_act: float
    max_act: float
    frac_nonzero: float
    n_tokens_counted: int
    hist_edges: list[float]
    hist_counts: list[int]
    bands: list[Band]
    logits_pos: list[TokenValue]
    logits_neg: list[TokenValue]
    neighbours: list[tuple[int, float]]
    windows: list[WindowInfo]
    label: LabelInfo | None
    run_id: int
    corpus: str
    dense_threshold: float = DEFAULT_DENSE_THRESHOLD
    # Shown labels of the neighbour features that have one, read with the feature's own.
    neighbour_labels: dict[int, LabelInfo] = field(default_factory=dict)
    # (id, version) of every label of this feature: part of the feature JSON's ETag.
    label_versions: tuple[tuple[int, int], ...] = ()
    # The model's display strings by token id (the cached list; renderers index it by id).
    vocab: list[str] = field(default_factory=list, compare=False, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)
    # Automatic drafts waiting for review (never the shown label), and the current scores of
    # every label of this feature by label id (part of the feature JSON's ETag too).
    drafts: list[LabelInfo] = field(default_factory=list)
    label_scores: dict[int, list[ScoreInfo]] = field(default_factory=dict)


@dataclass(frozen=True)
class SteerRunInfo:
    """A saved steering run; ``request`` is the generation request as it was sent."""

    id: int
    name: str
    sae_id: str
    author: str
    created_at: datetime
    request: dict[str, Any]
    default_text: str
    steered_text: str


@dataclass(frozen=True)
class SteerVectorInfo:
    """A saved steering vector; ``vector`` is its float32 values [d_model] as a list."""

    name: str
    sae_id: str
    hook_name: str
    position: str
    positive: list[str]
    negative: list[str]
    vector: list[float]
    norm: float
    aligned: list[dict[str, Any]]
    author: str
    created_at: datetime


@dataclass(frozen=True)
class ExplainerCounts:
    """One explainer's labels on one SAE, by status."""

    explainer: str  # e.g. "pattern" (its labels' author is "autointerp:pattern")
    total: int
    draft: int
    needs_review: int
    accepted: int
    rejected: int


@dataclass(frozen=True)
class ScoreSeries:
    """The current scores of one source's labels by one method and scorer, with the controls
    (random explanations) measured beside them."""

    source: str  # an explainer, or "people" for people's labels
    method: str
    scorer: str
    scores: list[float]
    controls: list[float]


@dataclass(frozen=True)
class AutointerpSummary:
    """Automatic descriptions of one SAE: features labeled (a shown label), drafted (an
    automatic draft waiting for review) and accepted (an accepted automatic label); labels per
    explainer; score distributions."""

    sae_id: str
    labeled: int
    drafted: int
    accepted: int
    explainers: list[ExplainerCounts]
    series: list[ScoreSeries]
