"""The live run of an SAE: which run it serves and that run's decoded constants, cached."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePath

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from app.errors import NotFoundError
from app.store import codec
from app.store.read_models import DEFAULT_DENSE_THRESHOLD, RunInfo, SAEBrief
from app.store.tables import Run

_run_t = Run.__table__
_RUN_CREATED = select(_run_t.c.created_at).where(_run_t.c.id == bindparam("run_id"))


@dataclass(frozen=True)
class RunBrief:
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
_RUN_CACHE: dict[tuple[str, int, datetime], RunBrief] = {}
_RUN_CACHE_SIZE = 16


def live_run(session: Session, sae: SAEBrief, created: datetime | None = None) -> RunBrief:
    """The live run of `sae`; `created` (its creation time) saves a query when the caller has it."""
    if sae.active_run_id is None:
        # The folder's name only: this message reaches public API responses.
        raise NotFoundError(
            f"SAE {sae.id!r} has no precomputed features yet; run `saescope build --sae "
            f"{PurePath(sae.path).name}` first"
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
    brief = RunBrief(
        id=run.id, corpus=run.corpus, n_tokens_counted=run.n_tokens_counted, n_bands=run.n_bands,
        hist_edges=codec.from_blob(run.hist_edges, codec.FLOAT64).tolist(),
        doc_names=list(run.doc_names or []), dense_threshold=dense_threshold(run),
        interval_fine_bins=(run.config or {}).get("interval_fine_bins"),
    )
    if len(_RUN_CACHE) >= _RUN_CACHE_SIZE:
        _RUN_CACHE.pop(next(iter(_RUN_CACHE)))
    _RUN_CACHE[key] = brief
    return brief


def dense_threshold(run: Run | RunInfo) -> float:
    """The run's dense line: the fraction of tokens above which a feature counts as dense."""
    return float((run.config or {}).get("dense_threshold", DEFAULT_DENSE_THRESHOLD))
