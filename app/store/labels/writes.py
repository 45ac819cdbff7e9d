"""Label writes: create, edit, review, withdraw; each one transaction with its revision row.

No lost update: an edit is one `UPDATE labels ... WHERE id = :id AND version = :expected`
statement, and a write that matched no row is stale (PreconditionFailedError). The revision
insert in the same transaction is unique on (label_id, version), a second guard. On SQLite the
commit is fsynced (write_session(durable=True): synchronous=FULL on the writing connection).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ConfigError, NotFoundError, PreconditionFailedError
from app.store.db import write_session
from app.store.labels.edits import LabelEdit, check_author, clean_edit
from app.store.labels.reads import label_info
from app.store.read_models import LabelInfo
from app.store.tables import LABEL_STATUSES, Label, LabelLease, LabelRevision, LabelTag, utcnow

_label_t = Label.__table__


def snapshot(label: LabelInfo) -> dict[str, Any]:
    return {"description": label.description, "tags": list(label.tags), "status": label.status,
            "confidence": label.confidence, "notes": label.notes}


def _add_revision(session: Session, *, label: LabelInfo, version: int, action: str, actor: str,
                  before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
    session.execute(insert(LabelRevision).values(
        label_id=label.id, version=version, sae_id=label.sae_id,
        feature_index=label.feature_index, action=action, actor=actor, created_at=utcnow(),
        before=before, after=after,
    ))


def _set_tags(session: Session, label_id: int, tags: list[str]) -> None:
    session.execute(delete(LabelTag).where(LabelTag.label_id == label_id))
    if tags:
        session.execute(insert(LabelTag), [{"label_id": label_id, "tag": t} for t in tags])


def _release_lease(session: Session, *, sae_id: str, index: int, author: str) -> None:
    session.execute(delete(LabelLease).where(
        LabelLease.sae_id == sae_id, LabelLease.feature_index == index,
        LabelLease.user_name == author))


def _stale(label_id: int, expected: int, session: Session) -> PreconditionFailedError:
    current = session.scalar(select(Label.version).where(Label.id == label_id))
    if current is None:
        return PreconditionFailedError(f"label {label_id} was withdrawn meanwhile")
    return PreconditionFailedError(
        f"label {label_id} changed meanwhile (version {current}, your edit was based on "
        f"version {expected}); reload, merge and save again")


def create_label(
    engine: Engine, *, sae_id: str, index: int, author: str, edit: LabelEdit,
    author_kind: str = "person", user_id: int | None = None, actor: str | None = None,
) -> LabelInfo:
    """The author's first label on a feature; PreconditionFailedError if they have one."""
    check_author(author, author_kind)
    edit = clean_edit(edit)
    now = utcnow()
    try:
        with write_session(engine, durable=True) as session:
            row = session.execute(insert(Label).values(
                sae_id=sae_id, feature_index=index, author=author, author_kind=author_kind,
                user_id=user_id, description=edit.description, tags=edit.tags,
                status=edit.status, confidence=edit.confidence, notes=edit.notes, version=1,
                reviewed_by=None, created_at=now, updated_at=now,
            ).returning(_label_t)).one()
            label = label_info(row)
            _set_tags(session, label.id, edit.tags)
            _add_revision(session, label=label, version=1, action="create",
                          actor=actor or author, before=None, after=snapshot(label))
            _release_lease(session, sae_id=sae_id, index=index, author=author)
    except IntegrityError:
        raise PreconditionFailedError(
            f"{author} already has a label on feature {index} of {sae_id}; edit that one "
            "(If-Match with its ETag)") from None
    return label


def update_label(
    engine: Engine, *, label_id: int, expected_version: int, edit: LabelEdit, actor: str,
) -> LabelInfo:
    """Replace a label's fields if it is still at `expected_version`."""
    edit = clean_edit(edit)
    with write_session(engine, durable=True) as session:
        before = session.execute(select(_label_t).where(_label_t.c.id == label_id)).first()
        if before is None:
            raise NotFoundError(f"no label {label_id}")
        row = session.execute(
            update(Label)
            .where(Label.id == label_id, Label.version == expected_version)
            .values(description=edit.description, tags=edit.tags, status=edit.status,
                    confidence=edit.confidence, notes=edit.notes, version=Label.version + 1,
                    updated_at=utcnow())
            .returning(_label_t)
        ).first()
        if row is None:
            raise _stale(label_id, expected_version, session)
        label = label_info(row)
        _set_tags(session, label_id, edit.tags)
        _add_revision(session, label=label, version=label.version, action="edit", actor=actor,
                      before=snapshot(label_info(before)), after=snapshot(label))
        _release_lease(session, sae_id=label.sae_id, index=label.feature_index,
                       author=label.author)
    return label


def review_label(
    engine: Engine, *, label_id: int, status: str, reviewer: str,
    expected_version: int | None = None,
) -> LabelInfo:
    """Set a label's status as a reviewer; bumps its version like any change."""
    if status not in LABEL_STATUSES:
        raise ConfigError(f"status: {status[:40]!r} is not one of {', '.join(LABEL_STATUSES)}")
    with write_session(engine, durable=True) as session:
        before = session.execute(select(_label_t).where(_label_t.c.id == label_id)).first()
        if before is None:
            raise NotFoundError(f"no label {label_id}")
        expected = before.version if expected_version is None else expected_version
        row = session.execute(
            update(Label).where(Label.id == label_id, Label.version == expected)
            .values(status=status, reviewed_by=reviewer, version=Label.version + 1,
                    updated_at=utcnow())
            .returning(_label_t)
        ).first()
        if row is None:
            raise _stale(label_id, expected, session)
        label = label_info(row)
        _add_revision(session, label=label, version=label.version, action="review",
                      actor=reviewer, before=snapshot(label_info(before)), after=snapshot(label))
    return label


def withdraw_label(engine: Engine, *, label_id: int, expected_version: int, actor: str) -> None:
    """Delete a label if still at `expected_version`; its history stays, ending in a withdraw."""
    with write_session(engine, durable=True) as session:
        before = session.execute(select(_label_t).where(_label_t.c.id == label_id)).first()
        if before is None:
            raise NotFoundError(f"no label {label_id}")
        deleted = session.execute(
            delete(Label).where(Label.id == label_id, Label.version == expected_version)
            .returning(Label.id)
        ).first()
        if deleted is None:
            raise _stale(label_id, expected_version, session)
        label = label_info(before)
        _add_revision(session, label=label, version=label.version + 1, action="withdraw",
                      actor=actor, before=snapshot(label), after=None)

