"""Saved steering runs and steering vectors: writes (durable, like labels) and keyword-only reads.

Both are human data keyed by plain strings (SAE id, vector name), never by a precompute run, so
they survive rebuilds. Only a run's or a vector's author may delete it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ConflictError, ForbiddenError, NotFoundError
from app.store.codec import FLOAT32, from_blob, to_blob
from app.store.read_models import SteerRunInfo, SteerVectorInfo
from app.store.tables import SteerRun, SteerVector, as_utc

MAX_LISTED = 500


def _storable(text: str) -> str:
    """Model text as a text column takes it: PostgreSQL refuses NUL, which a byte-level
    tokenizer can generate; it shows as the replacement character, as undecodable bytes do."""
    return text.replace("\x00", "\ufffd")


def _run_info(row: SteerRun) -> SteerRunInfo:
    return SteerRunInfo(id=row.id, name=row.name, sae_id=row.sae_id, author=row.author,
                        created_at=as_utc(row.created_at), request=dict(row.request),
                        default_text=row.default_text, steered_text=row.steered_text)


def save_run(*, session: Session, name: str, sae_id: str, request: dict[str, Any],
             default_text: str, steered_text: str, author: str) -> SteerRunInfo:
    row = SteerRun(name=name, sae_id=sae_id, request=request,
                   default_text=_storable(default_text), steered_text=_storable(steered_text),
                   author=author)
    session.add(row)
    session.flush()
    return _run_info(row)


def get_run(*, session: Session, run_id: int) -> SteerRunInfo:
    row = session.get(SteerRun, run_id)
    if row is None:
        raise NotFoundError(f"no saved steering run {run_id}")
    return _run_info(row)


def list_runs(*, session: Session, sae_id: str | None = None) -> list[SteerRunInfo]:
    """Saved runs, newest first (of one SAE when given)."""
    query = select(SteerRun).order_by(SteerRun.created_at.desc(), SteerRun.id.desc())
    if sae_id is not None:
        query = query.where(SteerRun.sae_id == sae_id)
    return [_run_info(row) for row in session.scalars(query.limit(MAX_LISTED))]


def delete_run(*, session: Session, run_id: int, author: str) -> None:
    row = session.get(SteerRun, run_id)
    if row is None:
        raise NotFoundError(f"no saved steering run {run_id}")
    if row.author != author:
        raise ForbiddenError(f"run {run_id} was saved by {row.author!r}; only they can delete it")
    session.delete(row)


def _vector_info(row: SteerVector) -> SteerVectorInfo:
    return SteerVectorInfo(
        name=row.name, sae_id=row.sae_id, hook_name=row.hook_name, position=row.position,
        positive=list(row.positive), negative=list(row.negative),
        vector=from_blob(row.vector, FLOAT32).tolist(), norm=row.norm,
        aligned=list(row.aligned), author=row.author, created_at=as_utc(row.created_at))


def save_vector(*, session: Session, name: str, sae_id: str, hook_name: str, position: str,
                positive: list[str], negative: list[str], vector: list[float], norm: float,
                aligned: list[dict[str, Any]], author: str) -> SteerVectorInfo:
    row = SteerVector(name=name, sae_id=sae_id, hook_name=hook_name, position=position,
                      positive=positive, negative=negative, vector=to_blob(vector, FLOAT32),
                      norm=norm, aligned=aligned, author=author)
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:
        raise ConflictError(f"a steering vector named {name!r} exists; pick another name or "
                            "delete it first") from exc
    return _vector_info(row)


def get_vectors(*, session: Session, names: list[str]) -> dict[str, SteerVectorInfo]:
    """The vectors of these names (NotFoundError naming any that is missing)."""
    if not names:
        return {}
    rows = session.scalars(select(SteerVector).where(SteerVector.name.in_(set(names))))
    found = {row.name: _vector_info(row) for row in rows}
    missing = sorted(set(names) - set(found))
    if missing:
        raise NotFoundError(f"no saved steering vector {', '.join(map(repr, missing))}; "
                            "see /api/v1/steer/vectors")
    return found


def vector_exists(*, session: Session, name: str) -> bool:
    return session.scalar(select(SteerVector.id).where(SteerVector.name == name)) is not None


def list_vectors(*, session: Session, sae_id: str | None = None) -> list[SteerVectorInfo]:
    query = select(SteerVector).order_by(SteerVector.name)
    if sae_id is not None:
        query = query.where(SteerVector.sae_id == sae_id)
    return [_vector_info(row) for row in session.scalars(query.limit(MAX_LISTED))]


def delete_vector(*, session: Session, name: str, author: str) -> None:
    row = session.scalars(select(SteerVector).where(SteerVector.name == name)).one_or_none()
    if row is None:
        raise NotFoundError(f"no saved steering vector {name!r}")
    if row.author != author:
        raise ForbiddenError(f"vector {name!r} was saved by {row.author!r}; only they can "
                             "delete it")
    session.delete(row)
