"""Label reads: a feature's labels, the label it shows, a person's own label, history, progress.

The shown label of a feature: its accepted label (the newest if several), else the newest label
written by a person that is not rejected. Automatic labels (from explainers) are never shown until
a reviewer accepts one.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, bindparam, case, func, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from app.store.read_models import LabelInfo, RevisionInfo
from app.store.tables import LABEL_STATUSES, Label, LabelRevision, as_utc

_label_t = Label.__table__
_rev_t = LabelRevision.__table__


def may_be_shown(label: Any = Label) -> ColumnElement[bool]:
    """SQL: this label can be the one its feature shows."""
    return or_(label.status == "accepted",
               and_(label.author_kind == "person", label.status != "rejected"))


def shown_order(label: Any = Label) -> list[ColumnElement[Any]]:
    """SQL ordering that puts a feature's shown label first among those that may be shown."""
    return [case((label.status == "accepted", 0), else_=1), label.updated_at.desc(),
            label.id.desc()]


def shown_label_id(*, sae_id: Any, feature_index: Any) -> Any:
    """A correlated scalar subquery: the id of the shown label of (sae_id, feature_index)."""
    inner = Label.__table__.alias("shown")
    return (select(inner.c.id)
            .where(inner.c.sae_id == sae_id, inner.c.feature_index == feature_index,
                   may_be_shown(inner.c))
            .order_by(*shown_order(inner.c)).limit(1).scalar_subquery())


def label_info(row: Any) -> LabelInfo:
    """From a Label object or a labels row."""
    return LabelInfo(
        id=row.id, sae_id=row.sae_id, feature_index=row.feature_index, author=row.author,
        author_kind=row.author_kind, description=row.description, tags=list(row.tags or []),
        status=row.status, confidence=row.confidence, notes=row.notes, version=row.version,
        reviewed_by=row.reviewed_by, created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
    )


def _shown_key(label: LabelInfo) -> tuple:
    return (label.status != "accepted", -label.updated_at.timestamp(), -label.id)


def pick_shown(labels: list[LabelInfo]) -> LabelInfo | None:
    """The shown label among one feature's labels (the same rule as shown_label_id)."""
    eligible = [lb for lb in labels if lb.status == "accepted"
                or (lb.author_kind == "person" and lb.status != "rejected")]
    return min(eligible, key=_shown_key) if eligible else None


_OF_FEATURES = select(_label_t).where(
    _label_t.c.sae_id == bindparam("sae_id"),
    _label_t.c.feature_index.in_(bindparam("indices", expanding=True)),
)


def labels_of(*, session: Session, sae_id: str, indices: list[int]) -> dict[int, list[LabelInfo]]:
    """Every label of these features, by feature index, the shown one first."""
    if not indices:
        return {}
    out: dict[int, list[LabelInfo]] = {}
    rows = session.connection().execute(_OF_FEATURES, {"sae_id": sae_id, "indices": indices})
    for row in rows:
        out.setdefault(row.feature_index, []).append(label_info(row))
    for index, labels in out.items():
        shown = pick_shown(labels)
        rest = sorted((lb for lb in labels if lb is not shown), key=_shown_key)
        out[index] = [shown, *rest] if shown else rest
    return out


def shown_labels(*, session: Session, sae_id: str, indices: list[int]) -> dict[int, LabelInfo]:
    """The shown label of each of these features that has one."""
    shown = {}
    for index, labels in labels_of(session=session, sae_id=sae_id, indices=indices).items():
        first = pick_shown(labels)
        if first is not None:
            shown[index] = first
    return shown


def feature_labels(*, session: Session, sae_id: str, index: int) -> list[LabelInfo]:
    """Everyone's labels of one feature, the shown one first."""
    return labels_of(session=session, sae_id=sae_id, indices=[index]).get(index, [])


def own_label(*, session: Session, sae_id: str, index: int, author: str,
              author_kind: str = "person") -> LabelInfo | None:
    row = session.execute(select(_label_t).where(
        _label_t.c.sae_id == sae_id, _label_t.c.feature_index == index,
        _label_t.c.author == author, _label_t.c.author_kind == author_kind,
    )).first()
    return label_info(row) if row is not None else None


def label_by_id(*, session: Session, label_id: int) -> LabelInfo | None:
    row = session.execute(select(_label_t).where(_label_t.c.id == label_id)).first()
    return label_info(row) if row is not None else None


def revision_info(row: Any) -> RevisionInfo:
    return RevisionInfo(id=row.id, label_id=row.label_id, version=row.version,
                        sae_id=row.sae_id, feature_index=row.feature_index, action=row.action,
                        actor=row.actor, created_at=as_utc(row.created_at), before=row.before,
                        after=row.after)


def feature_history(*, session: Session, sae_id: str, index: int) -> list[RevisionInfo]:
    """Every revision of every label of one feature (withdrawn ones too), newest first."""
    rows = session.execute(select(_rev_t).where(
        _rev_t.c.sae_id == sae_id, _rev_t.c.feature_index == index,
    ).order_by(_rev_t.c.id.desc()))
    return [revision_info(r) for r in rows]


def count_labeled(*, session: Session, sae_ids: list[str] | None = None) -> dict[str, int]:
    """Features with a shown label, by SAE id."""
    stmt = (select(Label.sae_id, func.count(func.distinct(Label.feature_index)))
            .where(may_be_shown(), Label.description != "").group_by(Label.sae_id))
    if sae_ids is not None:
        stmt = stmt.where(Label.sae_id.in_(sae_ids))
    return {sae_id: n for sae_id, n in session.execute(stmt)}


def progress(*, session: Session, sae_id: str) -> list[dict[str, Any]]:
    """Labels per person on one SAE, by status: [{author, total, draft, needs_review, ...}]."""
    rows = session.execute(
        select(Label.author, Label.status, func.count())
        .where(Label.sae_id == sae_id, Label.author_kind == "person")
        .group_by(Label.author, Label.status)
    ).all()
    by_author: dict[str, dict[str, Any]] = {}
    for author, status, n in rows:
        entry = by_author.setdefault(
            author, {"author": author, "total": 0, **dict.fromkeys(LABEL_STATUSES, 0)})
        entry[status] = n
        entry["total"] += n
    return sorted(by_author.values(), key=lambda e: (-e["total"], e["author"]))
