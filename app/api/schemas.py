"""Wire schemas of the JSON API (pydantic), built from the store's read models, never from ORM rows.

Feature JSON uses Neuronpedia's key names where one exists (camelCase included) so their
consumers can read ours; everything else is snake_case. The feature route serializes through
app/api/feature_json.py; FeatureOut here documents that shape.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.api.autointerp_schemas import AutointerpOut, DraftOut, ScoreOut
from app.api.public_paths import public_json, public_path
from app.records import CE_ABLATION_GAP_MIN_NATS, ce_loss_figures
from app.store.read_models import FeaturePage, LabelInfo, ModelInfo, SAEInfo

# --- errors ---------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    status: int
    message: str


class ErrorOut(BaseModel):
    """The one error shape of every /api response (404, 409, 422, 503, 500...)."""

    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "Unknown model, SAE or feature"},
    422: {"model": ErrorOut, "description": "Invalid input"},
}
VALIDATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorOut, "description": "Invalid input"},
}
MODEL_CALL_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    413: {"model": ErrorOut, "description": "Request body over this endpoint's limit"},
    503: {"model": ErrorOut, "description": "Model queue full or model not loaded (Retry-After)"},
}


# --- models and SAEs ------------------------------------------------------------------------------


class ModelOut(BaseModel):
    id: str
    source: str
    architecture: str
    d_model: int
    n_layers: int
    vocab_size: int
    bos_token_id: int | None
    has_chat_template: bool
    sae_ids: list[str]

    @classmethod
    def of(cls, m: ModelInfo, *, home: Path) -> ModelOut:
        """`home`: the data folder; paths in public fields are shown relative to it."""
        return cls(id=m.id, source=public_path(m.source, home=home), architecture=m.architecture,
                   d_model=m.d_model, n_layers=m.n_layers, vocab_size=m.vocab_size,
                   bos_token_id=m.bos_token_id, has_chat_template=m.has_chat_template,
                   sae_ids=m.sae_ids)


class ModelList(BaseModel):
    data: list[ModelOut]
    count: int


class RunOut(BaseModel):
    id: int
    corpus: str
    n_tokens: int
    n_tokens_counted: int
    context_size: int
    window_len: int
    n_top: int
    n_bands: int
    config: dict[str, Any]
    created_at: datetime


class SAEOut(BaseModel):
    """An SAE row of /api/v1/saes: what the home page lists."""

    id: str
    model_id: str
    hook_name: str
    architecture: str
    d_in: int
    d_sae: int
    path: str
    has_features: bool
    corpus: str | None
    n_tokens: int | None
    explained_variance: float | None
    ce_loss_recovered: float | None
    ce_loss_increase: float | None = Field(
        description="CE loss the SAE adds over the clean model, in nats")
    ce_loss_ablation_gap: float | None = Field(
        description="CE loss zero-ablating the hook adds, in nats (ce_loss_recovered's divisor)")
    ce_loss_recovered_unreliable: bool | None = Field(
        description=f"true when ce_loss_ablation_gap is under {CE_ABLATION_GAP_MIN_NATS} nats: "
                    "the ratio is then ill-conditioned; read ce_loss_increase")
    n_dead: int | None
    n_dense: int | None
    n_labeled: int

    @classmethod
    def of(cls, s: SAEInfo, *, home: Path) -> SAEOut:
        """`home`: the data folder; paths in public fields are shown relative to it."""
        stats = s.run.sae_stats if s.run else {}
        metrics = s.train_metrics or {}

        def stat(key: str) -> Any:
            # Precompute measures on held-out tokens; fall back to training's evals.json.
            value = stats.get(key)
            return value if value is not None else metrics.get(key)

        return cls(
            id=s.id, model_id=s.model_id, hook_name=s.hook_name, architecture=s.architecture,
            d_in=s.d_in, d_sae=s.d_sae, path=public_path(s.path, home=home),
            has_features=s.run is not None,
            corpus=public_path(s.run.corpus, home=home) if s.run else None,
            n_tokens=s.run.n_tokens if s.run else None,
            explained_variance=stat("explained_variance"),
            # All CE figures from one evaluation: the run's when it measured them, else training's.
            **ce_loss_figures(stats if stats.get("ce_loss_recovered") is not None else metrics),
            n_dead=stats.get("n_dead"), n_dense=stats.get("n_dense"), n_labeled=s.n_labeled,
        )


class SAEList(BaseModel):
    data: list[SAEOut]
    count: int


class SAEDetail(SAEOut):
    """One SAE with its overview statistics (L0 and density histograms, dead/dense counts)."""

    cfg: dict[str, Any]
    train_metrics: dict[str, Any] | None
    run: RunOut | None
    stats: dict[str, Any] = Field(description="Per-SAE statistics of the active precompute run")
    autointerp: AutointerpOut | None = Field(
        None, description="Automatic descriptions: features labeled, drafted and accepted; "
                          "score histograms per explainer")

    @classmethod
    def of(cls, s: SAEInfo, *, home: Path) -> SAEDetail:  # type: ignore[override]
        base = SAEOut.of(s, home=home).model_dump()
        run = None
        if s.run is not None:
            r = s.run
            run = RunOut(id=r.id, corpus=public_path(r.corpus, home=home), n_tokens=r.n_tokens,
                         n_tokens_counted=r.n_tokens_counted, context_size=r.context_size,
                         window_len=r.window_len, n_top=r.n_top, n_bands=r.n_bands,
                         config=public_json(r.config, home=home), created_at=r.created_at)
        # Paths inside these documents too (train_metrics.activation_cache,
        # stats.eval.reused_from.file, a cfg's dataset path...).
        return cls(**base, cfg=public_json(s.cfg, home=home),
                   train_metrics=public_json(s.train_metrics, home=home), run=run,
                   stats=public_json(s.run.sae_stats, home=home) if s.run else {})


# --- features -------------------------------------------------------------------------------------


class LabelOut(BaseModel):
    description: str
    tags: list[str]
    status: str
    author: str
    version: int
    updated_at: datetime

    @classmethod
    def of(cls, label: LabelInfo | None) -> LabelOut | None:
        if label is None:
            return None
        return cls(description=label.description, tags=label.tags, status=label.status,
                   author=label.author, version=label.version, updated_at=label.updated_at)


class ShownLabelOut(LabelOut):
    """The label a feature shows, with the scores of its current text."""

    id: int
    scores: list[ScoreOut]


class FeatureRowOut(BaseModel):
    index: int
    label: LabelOut | None
    frac_nonzero: float
    density: float
    max_act: float
    mean_act: float
    count: int
    top_tokens: list[str]


class FeatureList(BaseModel):
    data: list[FeatureRowOut]
    count: int = Field(description="Features matching the filters, over all pages")
    page: int
    per_page: int

    @classmethod
    def of(cls, page: FeaturePage) -> FeatureList:
        rows = [
            FeatureRowOut(index=r.index, label=LabelOut.of(r.label), frac_nonzero=r.frac_nonzero,
                          density=r.frac_nonzero, max_act=r.max_act, mean_act=r.mean_act,
                          count=r.count, top_tokens=r.top_tokens)
            for r in page.items
        ]
        return cls(data=rows, count=page.total, page=page.page, per_page=page.per_page)


class WindowDocumentOut(BaseModel):
    """A document a window shows. Builds pack short documents into one sequence, each opened by
    a BOS token, so a window may cross from one document into the next."""

    offset: int = Field(description="Index into the window's tokens where this document's text "
                        "shows from: 0 for the first (it may have begun before the window), "
                        "else the BOS token that opens it")
    doc_index: int = Field(description="The document's number in the run's corpus order")
    name: str | None = Field(description="The document's name (file, row or module)")


class ActivationOut(BaseModel):
    """A text window, in Neuronpedia's activation shape plus where it came from."""

    tokens: list[str]
    token_ids: list[int]
    values: list[float]
    maxValue: float  # noqa: N815 - Neuronpedia's key
    maxValueTokenIndex: int  # noqa: N815
    binMin: float  # noqa: N815 - interval windows: their band's lower edge; top windows: -1
    binMax: float  # noqa: N815 - interval windows: their band's upper edge; top windows: -1
    binContains: float  # noqa: N815 - interval windows: their band's share; top windows: -1
    kind: Literal["top", "interval"]
    band: int
    rank: int
    doc_name: str | None = Field(description="The document at the window's first token")
    documents: list[WindowDocumentOut] = Field(
        description="Every document the window shows, in order; more than one where the "
                    "window crosses a document boundary")
    seq_index: int
    start: int


class BandOut(BaseModel):
    band: int
    min: float
    max: float
    share: float
    count: int


class HistOut(BaseModel):
    edges: list[float]
    counts: list[int]


class NeighbourOut(BaseModel):
    index: int
    cos: float
    label: str | None


class FeatureOut(BaseModel):
    """One feature: Neuronpedia's keys, then saescope's own."""

    modelId: str  # noqa: N815 - Neuronpedia's key
    layer: str  # Neuronpedia calls the SAE id "layer" ("{layer}-{set}")
    index: int
    frac_nonzero: float
    maxActApprox: float  # noqa: N815
    pos_str: list[str]
    pos_values: list[float]
    neg_str: list[str]
    neg_values: list[float]
    freq_hist_data_bar_heights: list[int]
    freq_hist_data_bar_values: list[float]
    topkCosSimIndices: list[int]  # noqa: N815
    topkCosSimValues: list[float]  # noqa: N815
    activations: list[ActivationOut]
    # saescope's own
    sae_id: str
    model_id: str
    d_sae: int
    label: ShownLabelOut | None
    drafts: list[DraftOut] = Field(description="Automatic drafts waiting for review, with their "
                                               "scores; never the shown label until accepted")
    density: float
    count: int
    mean_act: float
    max_act: float
    dense: bool
    pos_ids: list[int]
    neg_ids: list[int]
    hist: HistOut
    bands: list[BandOut]
    neighbours: list[NeighbourOut]
    n_tokens_counted: int
    corpus: str
    prev_index: int | None
    next_index: int | None


class RandomFeatureOut(BaseModel):
    sae_id: str
    index: int


# --- model calls ----------------------------------------------------------------------------------

# Characters are capped before tokenizing so an oversized body costs nothing; tokens are capped
# after (settings.max_text_tokens). 32 characters per token is far above any real tokenizer's mean.
MAX_TEXT_CHARS_PER_TOKEN = 32


class TextIn(BaseModel):
    text: str = Field(min_length=1, description="Text to run through the model")


class SearchIn(TextIn):
    top_k: int = Field(5, ge=1, le=50, description="Features listed per token")
    n_features: int = Field(20, ge=1, le=200, description="Features listed for the whole text")


class TokenFeatureOut(BaseModel):
    index: int
    value: float
    label: str | None


class TextFeatureOut(BaseModel):
    index: int
    max_value: float
    max_token_index: int
    sum_value: float
    n_tokens: int
    label: str | None


class SearchOut(BaseModel):
    sae_id: str
    model_id: str
    tokens: list[str]
    token_ids: list[int]
    special: list[bool] = Field(description="BOS/special positions (left out of top_features)")
    per_token: list[list[TokenFeatureOut]]
    top_features: list[TextFeatureOut]


class FeatureActivationsOut(BaseModel):
    sae_id: str
    model_id: str
    index: int
    tokens: list[str]
    token_ids: list[int]
    values: list[float]
    special: list[bool]
    maxValue: float  # noqa: N815 - max over non-special tokens
    maxValueTokenIndex: int  # noqa: N815
