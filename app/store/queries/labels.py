"""Label reads: the labels of a set of features (label writes live in app/store/writer.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from app.store.read_models import LabelInfo
from app.store.tables import Label, as_utc

_label_t = Label.__table__
_LABELS = select(_label_t).where(
    _label_t.c.sae_id == bindparam("sae_id"),
    _label_t.c.feature_index.in_(bindparam("indices", expanding=True)),
)


def get_labels(*, session: Session, sae_id: str, indices: list[int]) -> dict[int, LabelInfo]:
    """The labels of these features that have one, by feature index."""
    if not indices:
        return {}
    rows = session.connection().execute(_LABELS, {"sae_id": sae_id, "indices": list(indices)})
    return {row.feature_index: label_info(row) for row in rows}


def label_info(label: Any) -> LabelInfo | None:
    """From a Label object or a labels row."""
    if label is None:
        return None
    return LabelInfo(description=label.description, tags=list(label.tags or []),
                     status=label.status, author=label.author, version=label.version,
                     updated_at=as_utc(label.updated_at))
