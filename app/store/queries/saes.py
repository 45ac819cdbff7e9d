"""SAE reads: the SAE list with run statistics, one SAE, and the brief row model calls check."""

from __future__ import annotations

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from app.errors import NotFoundError
from app.store.labels.reads import count_labeled
from app.store.read_models import RunInfo, SAEBrief, SAEInfo
from app.store.tables import SAE, Run, as_utc

_sae_t = SAE.__table__
_SAE_BRIEF = select(
    _sae_t.c.id, _sae_t.c.model_id, _sae_t.c.d_sae, _sae_t.c.path, _sae_t.c.active_run_id
).where(_sae_t.c.id == bindparam("sae_id"))


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
    labeled = count_labeled(session=session)
    return [_sae_info(s, runs.get(s.active_run_id), labeled.get(s.id, 0)) for s in saes]


def get_sae(*, session: Session, sae_id: str) -> SAEInfo:
    sae = session.get(SAE, sae_id)
    if sae is None:
        raise NotFoundError(f"no SAE {sae_id!r} in this database; see /api/v1/saes")
    run = session.get(Run, sae.active_run_id) if sae.active_run_id is not None else None
    n_labeled = count_labeled(session=session, sae_ids=[sae_id]).get(sae_id, 0)
    return _sae_info(sae, run, n_labeled)


def get_sae_brief(*, session: Session, sae_id: str) -> SAEBrief:
    """id, model_id, d_sae, path, active_run_id of an SAE (NotFoundError if unknown): what model
    calls and feature reads check first, in one prebuilt query instead of get_sae's row, run and
    label count."""
    row = session.connection().execute(_SAE_BRIEF, {"sae_id": sae_id}).one_or_none()
    if row is None:
        raise NotFoundError(f"no SAE {sae_id!r} in this database; see /api/v1/saes")
    return SAEBrief(*row)


def _sae_info(sae: SAE, run: Run | None, n_labeled: int) -> SAEInfo:
    run_info = None
    if run is not None:
        run_info = RunInfo(
            id=run.id, corpus=run.corpus, n_tokens=run.n_tokens,
            n_tokens_counted=run.n_tokens_counted, context_size=run.context_size,
            window_len=run.window_len, n_top=run.n_top, n_bands=run.n_bands,
            config=run.config or {}, sae_stats=run.sae_stats or {},
            created_at=as_utc(run.created_at),
        )
    return SAEInfo(
        id=sae.id, model_id=sae.model_id, hook_name=sae.hook_name, architecture=sae.architecture,
        d_in=sae.d_in, d_sae=sae.d_sae, path=sae.path, cfg=sae.cfg or {},
        train_metrics=sae.train_metrics, run=run_info, n_labeled=n_labeled,
    )
