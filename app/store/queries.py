"""Keyword-only reads for the API and pages: indexed SQL plus blob decoding, no model calls."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
from sqlalchemy import Text, and_, bindparam, cast, func, or_, select
from sqlalchemy.orm import Session

from app.errors import ConfigError, NotFoundError
from app.records import WINDOW_KIND_TOP, band_edge_values
from app.store import codec
from app.store.tables import SAE, Feature, FeatureToken, Label, Model, Run, Sequence, Window

# A feature firing on more than this fraction of tokens counts as dense (SAELens' dashboards and
# Neuronpedia use the same 10% line), unless the run recorded its own threshold.
DEFAULT_DENSE_THRESHOLD = 0.1
MAX_PER_PAGE = 500
TOP_TOKENS_PER_FEATURE = 5

SortKey = Literal["index", "frac_nonzero", "max_act", "mean_act"]
FilterKey = Literal["all", "alive", "dead", "dense", "labeled", "unlabeled"]
SORT_COLUMNS = {
    "index": Feature.index,
    "frac_nonzero": Feature.frac_nonzero,
    "max_act": Feature.max_act,
    "mean_act": Feature.mean_act,
}


# Hot-path statements, built once: a feature page runs seven small indexed queries, and building
# and coercing SQLAlchemy constructs per request cost more than SQLite answering them.
_sae_t, _run_t, _model_t = SAE.__table__, Run.__table__, Model.__table__
_feature_t, _window_t, _seq_t, _label_t = (
    Feature.__table__, Window.__table__, Sequence.__table__, Label.__table__
)
_SAE_BRIEF = select(
    _sae_t.c.id, _sae_t.c.model_id, _sae_t.c.d_sae, _sae_t.c.path, _sae_t.c.active_run_id
).where(_sae_t.c.id == bindparam("sae_id"))
_SAE_IDS = select(_sae_t.c.model_id, _sae_t.c.id).order_by(_sae_t.c.id)
_MODELS = select(
    _model_t.c.id, _model_t.c.source, _model_t.c.architecture, _model_t.c.d_model,
    _model_t.c.n_layers, _model_t.c.vocab_size, _model_t.c.bos_token_id,
    _model_t.c.has_chat_template,
).order_by(_model_t.c.id)
_RUN_CREATED = select(_run_t.c.created_at).where(_run_t.c.id == bindparam("run_id"))
_VOCAB_SHA = select(_model_t.c.token_strings_sha).where(_model_t.c.id == bindparam("model_id"))
_VOCAB_BLOB = select(_model_t.c.token_strings).where(_model_t.c.id == bindparam("model_id"))
_FEATURE_ROW = select(_feature_t).where(
    _feature_t.c.run_id == bindparam("run_id"), _feature_t.c.index == bindparam("index")
)
# A feature read starts with one row saying which run is live and which vocabulary to use.
_FEATURE_HEAD = (
    select(_sae_t.c.id, _sae_t.c.model_id, _sae_t.c.d_sae, _sae_t.c.path,
           _sae_t.c.active_run_id, _run_t.c.created_at, _model_t.c.token_strings_sha)
    .select_from(
        _sae_t.outerjoin(_run_t, _run_t.c.id == _sae_t.c.active_run_id)
        .outerjoin(_model_t, _model_t.c.id == _sae_t.c.model_id)
    )
    .where(_sae_t.c.id == bindparam("sae_id"))
)
# Windows with their sequence's tokens in one query (a sequence's 512 bytes may come twice when
# two windows share it; cheaper than a second round trip).
_WINDOWS = (
    select(_window_t.c.kind, _window_t.c.band, _window_t.c.rank, _window_t.c.seq_index,
           _window_t.c.start, _window_t.c.length, _window_t.c.max_value, _window_t.c.max_pos,
           _window_t.c["values"], _seq_t.c.doc_index, _seq_t.c.tokens)
    .select_from(_window_t.join(_seq_t, and_(_seq_t.c.run_id == _window_t.c.run_id,
                                             _seq_t.c.seq_index == _window_t.c.seq_index)))
    .where(_window_t.c.run_id == bindparam("run_id"), _window_t.c.feature == bindparam("index"))
    .order_by(_window_t.c.kind, _window_t.c.band.desc(), _window_t.c.rank)
)
# The first few tokens per feature, ranked in SQL (a window function: SQLite >= 3.25, PostgreSQL)
# so only those rows reach Python.
_ft_t = FeatureToken.__table__
_ranked_tokens = select(
    _ft_t.c.feature, _ft_t.c.token_id,
    func.row_number().over(
        partition_by=_ft_t.c.feature, order_by=(_ft_t.c.count.desc(), _ft_t.c.token_id)
    ).label("rank"),
).where(
    _ft_t.c.run_id == bindparam("run_id"),
    _ft_t.c.feature.in_(bindparam("indices", expanding=True)),
).subquery()
_TOP_TOKENS = (
    select(_ranked_tokens.c.feature, _ranked_tokens.c.token_id)
    .where(_ranked_tokens.c.rank <= bindparam("n"))
    .order_by(_ranked_tokens.c.feature, _ranked_tokens.c.rank)
)
_LABELS = select(_label_t).where(
    _label_t.c.sae_id == bindparam("sae_id"),
    _label_t.c.feature_index.in_(bindparam("indices", expanding=True)),
)


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
class LabelInfo:
    description: str
    tags: list[str]
    status: str
    author: str
    version: int
    updated_at: datetime


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


@dataclass(slots=True)  # not frozen: a feature read builds ~50 of these (frozen init is slower)
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
    doc_name: str | None
    # The stored float16 values themselves, for renderers that work on arrays (not compared).
    values_f16: np.ndarray | None = field(default=None, compare=False, repr=False)


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
    # Labels of the neighbour features that have one, read in the same query as the feature's own.
    neighbour_labels: dict[int, LabelInfo] = field(default_factory=dict)
    # The model's display strings by token id (the cached list; renderers index it by id).
    vocab: list[str] = field(default_factory=list, compare=False, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)


def list_models(*, session: Session) -> list[ModelInfo]:
    """Models with their SAE ids (Core statements: every page's top bar calls this)."""
    conn = session.connection()
    sae_ids: dict[str, list[str]] = {}
    for model_id, sae_id in conn.execute(_SAE_IDS):
        sae_ids.setdefault(model_id, []).append(sae_id)
    return [ModelInfo(*row, sae_ids=sae_ids.get(row.id, [])) for row in conn.execute(_MODELS)]


def get_model_vocab(*, session: Session, model_id: str) -> list[str]:
    """Display string of every token id of the model (cached across requests by content hash)."""
    conn = session.connection()
    sha = conn.execute(_VOCAB_SHA, {"model_id": model_id}).scalar()
    if sha is None:
        raise NotFoundError(f"no model {model_id!r} in this database; see /api/v1/models")
    cached = codec.cached_vocab(sha)
    if cached is not None:
        return cached
    blob = conn.execute(_VOCAB_BLOB, {"model_id": model_id}).scalar()
    return codec.decode_vocab(blob, sha)


def list_saes(*, session: Session, model_id: str | None = None) -> list[SAEInfo]:
    stmt = select(SAE).order_by(SAE.model_id, SAE.id)
    if model_id is not None:
        stmt = stmt.where(SAE.model_id == model_id)
    saes = session.scalars(stmt).all()
    runs = {
        r.id: r
        for r in session.scalars(
            select(Run).where(Run.id.in_([s.active_run_id for s in saes if s.active_run_id]))
        )
    }
    labeled = dict(session.execute(
        select(Label.sae_id, func.count()).where(Label.description != "").group_by(Label.sae_id)
    ).all())
    return [_sae_info(s, runs.get(s.active_run_id), labeled.get(s.id, 0)) for s in saes]


def get_sae(*, session: Session, sae_id: str) -> SAEInfo:
    sae = _sae_row(session, sae_id)
    run = session.get(Run, sae.active_run_id) if sae.active_run_id is not None else None
    n_labeled = session.scalar(
        select(func.count()).select_from(Label)
        .where(Label.sae_id == sae_id, Label.description != "")
    )
    return _sae_info(sae, run, n_labeled or 0)


def get_sae_brief(*, session: Session, sae_id: str) -> _SAEBrief:
    """id, model_id, d_sae, path, active_run_id of an SAE (NotFoundError if unknown): what model
    calls check first, in one prebuilt query instead of get_sae's row, run and label count."""
    return _sae_brief(session, sae_id)


@dataclass(frozen=True)
class _SAEBrief:
    id: str
    model_id: str
    d_sae: int
    path: str
    active_run_id: int | None


def _sae_brief(session: Session, sae_id: str) -> _SAEBrief:
    """The few SAE columns hot paths need (no JSON columns to decode)."""
    row = session.connection().execute(_SAE_BRIEF, {"sae_id": sae_id}).one_or_none()
    if row is None:
        raise NotFoundError(f"no SAE {sae_id!r} in this database; see /api/v1/saes")
    return _SAEBrief(*row)


@dataclass(frozen=True)
class _RunBrief:
    id: int
    corpus: str
    n_tokens_counted: int
    n_bands: int
    hist_edges: list[float]
    doc_names: list[str]
    dense_threshold: float
    interval_fine_bins: int | None  # None: a run written before the grid was recorded


# Runs never change once written (a rebuild writes a new run with a new id, and ids are never
# reused: AUTOINCREMENT on SQLite, a sequence on PostgreSQL), so their decoded JSON and blobs can
# be kept across requests. Feature pages would otherwise decode every document name each time.
# The key adds the database URL and the run's creation time, so another database, or a database
# file replaced by a rebuilt one, never hits an entry made for a different run.
_RUN_CACHE: dict[tuple[str, int, datetime], _RunBrief] = {}
_RUN_CACHE_SIZE = 16


def _run_brief(session: Session, sae: _SAEBrief, created: datetime | None = None) -> _RunBrief:
    """The live run of `sae`; `created` (its creation time) saves a query when the caller has it."""
    if sae.active_run_id is None:
        raise NotFoundError(
            f"SAE {sae.id!r} has no precomputed features yet; run `saescope build --sae "
            f"{sae.path}` first"
        )
    if created is None:
        created = session.connection().execute(
            _RUN_CREATED, {"run_id": sae.active_run_id}).scalar()
    if created is None:  # pragma: no cover - the swap sets active_run_id and the run together
        raise NotFoundError(f"run {sae.active_run_id} of SAE {sae.id!r} is missing")
    key = (str(session.get_bind().engine.url), sae.active_run_id, created)
    cached = _RUN_CACHE.get(key)
    if cached is not None:
        return cached
    run = session.get(Run, sae.active_run_id)
    brief = _RunBrief(
        id=run.id, corpus=run.corpus, n_tokens_counted=run.n_tokens_counted, n_bands=run.n_bands,
        hist_edges=codec.from_blob(run.hist_edges, codec.FLOAT64).tolist(),
        doc_names=list(run.doc_names or []), dense_threshold=dense_threshold(run),
        interval_fine_bins=(run.config or {}).get("interval_fine_bins"),
    )
    if len(_RUN_CACHE) >= _RUN_CACHE_SIZE:
        _RUN_CACHE.pop(next(iter(_RUN_CACHE)))
    _RUN_CACHE[key] = brief
    return brief


def _sae_row(session: Session, sae_id: str) -> SAE:
    sae = session.get(SAE, sae_id)
    if sae is None:
        raise NotFoundError(f"no SAE {sae_id!r} in this database; see /api/v1/saes")
    return sae


def _sae_info(sae: SAE, run: Run | None, n_labeled: int) -> SAEInfo:
    run_info = None
    if run is not None:
        run_info = RunInfo(
            id=run.id, corpus=run.corpus, n_tokens=run.n_tokens,
            n_tokens_counted=run.n_tokens_counted, context_size=run.context_size,
            window_len=run.window_len, n_top=run.n_top, n_bands=run.n_bands,
            config=run.config or {}, sae_stats=run.sae_stats or {}, created_at=run.created_at,
        )
    return SAEInfo(
        id=sae.id, model_id=sae.model_id, hook_name=sae.hook_name, architecture=sae.architecture,
        d_in=sae.d_in, d_sae=sae.d_sae, path=sae.path, cfg=sae.cfg or {},
        train_metrics=sae.train_metrics, run=run_info, n_labeled=n_labeled,
    )


def dense_threshold(run: Run | RunInfo) -> float:
    return float((run.config or {}).get("dense_threshold", DEFAULT_DENSE_THRESHOLD))


def token_ids_matching(*, vocab: list[str], token: str) -> list[int]:
    """Ids for a token query: a number is an id; text matches a display string exactly or up to
    surrounding whitespace (so "the" finds " the" and "the")."""
    token = token.strip("\n") if token.strip() else token
    if token.strip().isdigit():
        return [int(token.strip())]
    wanted = token.strip()
    return [i for i, s in enumerate(vocab) if s == token or (wanted and s.strip() == wanted)]


def list_features(
    *,
    session: Session,
    sae_id: str,
    sort: SortKey = "index",
    order: Literal["asc", "desc"] = "asc",
    filter: FilterKey = "all",  # noqa: A002 - the query parameter's public name
    tag: str | None = None,
    q: str | None = None,
    token: str | None = None,
    page: int = 1,
    per_page: int = 50,
) -> FeaturePage:
    """A page of the feature table with its total count; ties sort by index."""
    if sort not in SORT_COLUMNS:
        raise ConfigError(f"sort {sort!r}: use one of {', '.join(SORT_COLUMNS)}")
    if not 1 <= per_page <= MAX_PER_PAGE or page < 1:
        raise ConfigError(f"page must be >= 1 and per_page in [1, {MAX_PER_PAGE}]")
    sae = _sae_brief(session, sae_id)
    run = _run_brief(session, sae)
    label_on = and_(Label.sae_id == sae_id, Label.feature_index == Feature.index)
    conditions = [Feature.run_id == run.id]
    alive = Feature.count > 0
    if filter == "alive":
        conditions.append(alive)
    elif filter == "dead":
        conditions.append(Feature.count == 0)
    elif filter == "dense":
        conditions.append(Feature.frac_nonzero > run.dense_threshold)
    elif filter == "labeled":
        conditions.append(and_(Label.id.is_not(None), Label.description != ""))
    elif filter == "unlabeled":
        conditions.append(or_(Label.id.is_(None), Label.description == ""))
    elif filter != "all":
        raise ConfigError(
            f"filter {filter!r}: use one of all, alive, dead, dense, labeled, unlabeled"
        )
    if tag:
        clean = tag.strip().lower()
        escaped = clean.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conditions.append(cast(Label.tags, Text).like(f'%"{escaped}"%', escape="\\"))
    if q:
        escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conditions.append(Label.description.ilike(f"%{escaped}%", escape="\\"))
    if token:
        vocab = get_model_vocab(session=session, model_id=sae.model_id)
        ids = token_ids_matching(vocab=vocab, token=token)
        conditions.append(Feature.index.in_(
            select(FeatureToken.feature).where(
                FeatureToken.run_id == run.id, FeatureToken.token_id.in_(ids or [-1])
            )
        ))
    # The page query should walk the sort column's index and stop after one page. "count + 0"
    # keeps the planner from filtering "alive" (nearly every row) through the count index and
    # then sorting all of them; the count query does want that index.
    page_conditions = [Feature.count + 0 > 0 if c is alive else c for c in conditions]
    counted = select(func.count()).select_from(Feature)
    if filter in ("labeled", "unlabeled") or tag or q:
        counted = counted.outerjoin(Label, label_on)
    # Written as a plain count (no subquery) so SQLite answers it from a covering index.
    total = session.scalar(counted.where(*conditions)) or 0
    sort_col = SORT_COLUMNS[sort]
    ordering = [sort_col.desc() if order == "desc" else sort_col.asc()]
    if sort != "index":
        ordering.append(Feature.index.asc())
    rows = session.execute(
        select(Feature.index, Feature.count, Feature.frac_nonzero, Feature.max_act,
               Feature.mean_act, Label)
        .outerjoin(Label, label_on).where(*page_conditions)
        .order_by(*ordering).limit(per_page).offset((page - 1) * per_page)
    ).all()
    indices = [r.index for r in rows]
    top = _top_tokens(session, run_id=run.id, model_id=sae.model_id, indices=indices)
    items = [
        FeatureRow(index=r.index, count=r.count, frac_nonzero=r.frac_nonzero, max_act=r.max_act,
                   mean_act=r.mean_act, label=_label_info(r.Label), top_tokens=top.get(r.index, []))
        for r in rows
    ]
    return FeaturePage(items=items, total=total, page=page, per_page=per_page)


def _top_tokens(
    session: Session, *, run_id: int, model_id: str, indices: list[int]
) -> dict[int, list[str]]:
    if not indices:
        return {}
    rows = session.connection().execute(
        _TOP_TOKENS, {"run_id": run_id, "indices": list(indices), "n": TOP_TOKENS_PER_FEATURE}
    ).all()
    vocab = get_model_vocab(session=session, model_id=model_id)
    out: dict[int, list[str]] = {}
    for feature, token_id in rows:
        out.setdefault(feature, []).append(_token_str(vocab, token_id))
    return out


def _token_str(vocab: list[str], token_id: int) -> str:
    return vocab[token_id] if 0 <= token_id < len(vocab) else f"<{token_id}>"


def _label_info(label: Any) -> LabelInfo | None:
    """From a Label object or a labels row."""
    if label is None:
        return None
    return LabelInfo(description=label.description, tags=list(label.tags or []),
                     status=label.status, author=label.author, version=label.version,
                     updated_at=label.updated_at)


def get_labels(*, session: Session, sae_id: str, indices: list[int]) -> dict[int, LabelInfo]:
    if not indices:
        return {}
    rows = session.connection().execute(_LABELS, {"sae_id": sae_id, "indices": list(indices)})
    return {row.feature_index: _label_info(row) for row in rows}


def random_feature(*, session: Session, sae_id: str, alive_only: bool = True) -> int:
    """A uniformly random feature index (alive ones only, unless none fired)."""
    sae = _sae_brief(session, sae_id)
    run = _run_brief(session, sae)
    stmt = select(func.count()).select_from(Feature).where(Feature.run_id == run.id)
    if alive_only:
        n_alive = session.scalar(stmt.where(Feature.count > 0)) or 0
        if n_alive:
            k = random.randrange(n_alive)
            return session.scalar(
                select(Feature.index).where(Feature.run_id == run.id, Feature.count > 0)
                .order_by(Feature.index).offset(k).limit(1)
            )
    return random.randrange(sae.d_sae)


def get_feature(*, session: Session, sae_id: str, index: int) -> FeatureDetail:
    """Everything a feature page shows, from one run's rows and blobs.

    Four indexed queries on one connection (SAE + run + vocabulary hash; the feature row; its
    windows joined to their sequences; the labels of the feature and its neighbours): this is
    the explorer's hottest read.
    """
    conn = session.connection()
    head = conn.execute(_FEATURE_HEAD, {"sae_id": sae_id}).one_or_none()
    if head is None:
        raise NotFoundError(f"no SAE {sae_id!r} in this database; see /api/v1/saes")
    sae = _SAEBrief(*head[:5])
    if not 0 <= index < sae.d_sae:
        raise NotFoundError(
            f"SAE {sae_id!r} has features 0..{sae.d_sae - 1}; there is no feature {index}"
        )
    run = _run_brief(session, sae, created=head.created_at)
    feat = conn.execute(_FEATURE_ROW, {"run_id": run.id, "index": index}).one_or_none()
    if feat is None:
        raise NotFoundError(f"feature {index} of {sae_id!r} is missing from run {run.id}")
    vocab = (codec.cached_vocab(head.token_strings_sha) if head.token_strings_sha else None) \
        or get_model_vocab(session=session, model_id=sae.model_id)
    n_vocab = len(vocab)

    def strings(ids: list[int]) -> list[str]:
        if ids and (min(ids) < 0 or max(ids) >= n_vocab):
            return [_token_str(vocab, t) for t in ids]
        return [vocab[t] for t in ids]

    doc_names = run.doc_names
    n_docs = len(doc_names)
    window_infos = []
    rows = conn.execute(_WINDOWS, {"run_id": run.id, "index": index}).all()
    for (kind, band, rank, seq_index, start, length, max_value, max_pos, values_blob, doc_index,
         tokens_blob) in rows:
        ids = np.frombuffer(tokens_blob, dtype=codec.INT32, count=length, offset=4 * start).tolist()
        f16 = np.frombuffer(values_blob, dtype=codec.FLOAT16)
        window_infos.append(WindowInfo(
            "top" if kind == WINDOW_KIND_TOP else "interval", band, rank, ids, strings(ids),
            f16.astype(np.float32).tolist(), max_value, max_pos, seq_index, start,
            doc_names[doc_index] if 0 <= doc_index < n_docs else None, f16,
        ))

    share = codec.from_blob(feat.band_share, codec.FLOAT32).tolist()
    band_count = codec.from_blob(feat.band_count, codec.INT64).tolist()
    # Interval bands split [0, max_act] into equal widths, each edge snapped to the run's fine
    # grid (records.band_edge_bins): the edges the samples were drawn with. Runs written before
    # the grid was recorded show the nominal edges.
    if run.interval_fine_bins and run.n_bands:
        edges = band_edge_values(feat.max_act, n_bands=run.n_bands,
                                 n_fine=run.interval_fine_bins)
    else:
        width = feat.max_act / run.n_bands if run.n_bands else 0.0
        edges = [b * width for b in range(run.n_bands + 1)]
    bands = [Band(band=b, lo=edges[b], hi=edges[b + 1], share=share[b], count=band_count[b])
             for b in range(len(share))]

    def token_values(ids_blob: bytes, values_blob: bytes) -> list[TokenValue]:
        ids = codec.from_blob(ids_blob, codec.INT32).tolist()
        vals = codec.from_blob(values_blob, codec.FLOAT32).tolist()
        return [TokenValue(t, s, v) for t, s, v in zip(ids, strings(ids), vals, strict=True)]

    neighbour_ids = codec.from_blob(feat.neighbour_idx, codec.INT32).tolist()
    neighbour_cos = codec.from_blob(feat.neighbour_cos, codec.FLOAT32).tolist()
    neighbours = list(zip(neighbour_ids, neighbour_cos, strict=True))
    labels = {
        row.feature_index: _label_info(row)
        for row in conn.execute(_LABELS, {"sae_id": sae_id, "indices": [index, *neighbour_ids]})
    }
    own_label = labels.pop(index, None)
    return FeatureDetail(
        sae_id=sae.id, model_id=sae.model_id, index=index, d_sae=sae.d_sae, count=feat.count,
        act_sum=feat.act_sum, mean_act=feat.mean_act, max_act=feat.max_act,
        frac_nonzero=feat.frac_nonzero, n_tokens_counted=run.n_tokens_counted,
        hist_edges=run.hist_edges,
        hist_counts=codec.from_blob(feat.hist_counts, codec.INT64).tolist(),
        bands=bands,
        logits_pos=token_values(feat.logit_pos_ids, feat.logit_pos_values),
        logits_neg=token_values(feat.logit_neg_ids, feat.logit_neg_values),
        neighbours=neighbours, windows=window_infos, label=own_label,
        run_id=run.id, corpus=run.corpus, dense_threshold=run.dense_threshold,
        neighbour_labels=labels, vocab=vocab,
    )
