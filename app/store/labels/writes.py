"""Label writes: create, edit, review, withdraw; each one transaction with its revision row.

No lost update: an edit is one `UPDATE labels ... WHERE id = :id AND version = :expected`
statement, and a write that matched no row is stale (PreconditionFailedError). The revision
insert in the same transaction is unique on (label_id, version), a second guard. Every write is
durable (store/group_commit.py: on SQLite, synchronous=FULL on the writing connection, and
writes arriving together share one fsync, each in its own savepoint).

The statements are built once, at import, with bind parameters: building and cache-keying a
SQLAlchemy statement per call cost more CPU than SQLite spent running it (bench/labels.py).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, bindparam, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ConfigError, NotFoundError, PreconditionFailedError
from app.store.group_commit import durable_write
from app.store.labels.edits import LabelEdit, check_author, clean_edit
from app.store.labels.reads import label_info
from app.store.read_models import LabelInfo
from app.store.tables import LABEL_STATUSES, Label, LabelLease, LabelRevision, LabelTag, utcnow

_label_t = Label.__table__
_tag_t = LabelTag.__table__
_rev_t = LabelRevision.__table__
_lease_t = LabelLease.__table__

_SELECT = select(_label_t).where(_label_t.c.id == bindparam("id"))
_VERSION = select(_label_t.c.version).where(_label_t.c.id == bindparam("id"))
_CREATE = insert(_label_t).returning(_label_t)
_EDIT = (
    update(_label_t)
    .where(_label_t.c.id == bindparam("label_id"), _label_t.c.version == bindparam("expected"))
    .values(description=bindparam("new_description"), tags=bindparam("new_tags"),
            status=bindparam("new_status"), confidence=bindparam("new_confidence"),
            notes=bindparam("new_notes"), version=_label_t.c.version + 1,
            updated_at=bindparam("now"))
    .returning(_label_t)
)
_REVIEW = (
    update(_label_t)
    .where(_label_t.c.id == bindparam("label_id"), _label_t.c.version == bindparam("expected"))
    .values(status=bindparam("new_status"), reviewed_by=bindparam("reviewer"),
            version=_label_t.c.version + 1, updated_at=bindparam("now"))
    .returning(_label_t)
)
_WITHDRAW = (
    delete(_label_t)
    .where(_label_t.c.id == bindparam("id"), _label_t.c.version == bindparam("expected"))
    .returning(_label_t.c.id)
)
_DELETE_TAGS = delete(_tag_t).where(_tag_t.c.label_id == bindparam("label_id"))
_INSERT_TAG = insert(_tag_t)
_INSERT_REVISION = insert(_rev_t)
_RELEASE_LEASE = delete(_lease_t).where(
    _lease_t.c.sae_id == bindparam("sae_id"), _lease_t.c.feature_index == bindparam("index"),
    _lease_t.c.user_name == bindparam("user"))


def snapshot(label: LabelInfo) -> dict[str, Any]:
    return {"description": label.description, "tags": list(label.tags), "status": label.status,
            "confidence": label.confidence, "notes": label.notes}


def _add_revision(conn: Connection | Session, *, label: LabelInfo, version: int, action: str,
                  actor: str, before: dict[str, Any] | None,
                  after: dict[str, Any] | None) -> None:
    conn.execute(_INSERT_REVISION, {
        "label_id": label.id, "version": version, "sae_id": label.sae_id,
        "feature_index": label.feature_index, "action": action, "actor": actor,
        "created_at": utcnow(), "before": before, "after": after})


def _set_tags(conn: Connection, label_id: int, tags: list[str]) -> None:
    conn.execute(_DELETE_TAGS, {"label_id": label_id})
    if tags:
        conn.execute(_INSERT_TAG, [{"label_id": label_id, "tag": t} for t in tags])


def _release_lease(conn: Connection, *, sae_id: str, index: int, author: str) -> None:
    conn.execute(_RELEASE_LEASE, {"sae_id": sae_id, "index": index, "user": author})


def _before(conn: Connection, label_id: int) -> LabelInfo:
    row = conn.execute(_SELECT, {"id": label_id}).first()
    if row is None:
        raise NotFoundError(f"no label {label_id}")
    return label_info(row)


def _stale(label_id: int, expected: int, conn: Connection | Session) -> PreconditionFailedError:
    current = conn.execute(_VERSION, {"id": label_id}).scalar()
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

    def job(session: Session) -> LabelInfo:
        conn = session.connection()
        now = utcnow()
        row = conn.execute(_CREATE, {
            "sae_id": sae_id, "feature_index": index, "author": author,
            "author_kind": author_kind, "user_id": user_id, "description": edit.description,
            "tags": edit.tags, "status": edit.status, "confidence": edit.confidence,
            "notes": edit.notes, "version": 1, "reviewed_by": None, "created_at": now,
            "updated_at": now}).one()
        label = label_info(row)
        _set_tags(conn, label.id, edit.tags)
        _add_revision(conn, label=label, version=1, action="create", actor=actor or author,
                      before=None, after=snapshot(label))
        _release_lease(conn, sae_id=sae_id, index=index, author=author)
        return label

    try:
        return durable_write(engine, job)
    except IntegrityError:
        raise PreconditionFailedError(
            f"{author} already has a label on feature {index} of {sae_id}; edit that one "
            "(If-Match with its ETag)") from None


def update_label(
    engine: Engine, *, label_id: int, expected_version: int, edit: LabelEdit, actor: str,
) -> LabelInfo:
    """Replace a label's fields if it is still at `expected_version`."""
    edit = clean_edit(edit)

    def job(session: Session) -> LabelInfo:
        conn = session.connection()
        before = _before(conn, label_id)
        row = conn.execute(_EDIT, {
            "label_id": label_id, "expected": expected_version, "new_description": edit.description,
            "new_tags": edit.tags, "new_status": edit.status,
            "new_confidence": edit.confidence, "new_notes": edit.notes, "now": utcnow()}).first()
        if row is None:
            raise _stale(label_id, expected_version, conn)
        label = label_info(row)
        if label.tags != before.tags:
            _set_tags(conn, label_id, edit.tags)
        _add_revision(conn, label=label, version=label.version, action="edit", actor=actor,
                      before=snapshot(before), after=snapshot(label))
        _release_lease(conn, sae_id=label.sae_id, index=label.feature_index, author=label.author)
        return label

    return durable_write(engine, job)


def review_label(
    engine: Engine, *, label_id: int, status: str, reviewer: str,
    expected_version: int | None = None,
) -> LabelInfo:
    """Set a label's status as a reviewer; bumps its version like any change."""
    if status not in LABEL_STATUSES:
        raise ConfigError(f"status: {status[:40]!r} is not one of {', '.join(LABEL_STATUSES)}")

    def job(session: Session) -> LabelInfo:
        conn = session.connection()
        before = _before(conn, label_id)
        expected = before.version if expected_version is None else expected_version
        row = conn.execute(_REVIEW, {"label_id": label_id, "expected": expected,
                                     "new_status": status, "reviewer": reviewer,
                                     "now": utcnow()}).first()
        if row is None:
            raise _stale(label_id, expected, conn)
        label = label_info(row)
        _add_revision(conn, label=label, version=label.version, action="review",
                      actor=reviewer, before=snapshot(before), after=snapshot(label))
        return label

    return durable_write(engine, job)


def withdraw_label(engine: Engine, *, label_id: int, expected_version: int, actor: str) -> None:
    """Delete a label if still at `expected_version`; its history stays, ending in a withdraw."""

    def job(session: Session) -> None:
        conn = session.connection()
        before = _before(conn, label_id)
        if conn.execute(_WITHDRAW, {"id": label_id, "expected": expected_version}).first() \
                is None:
            raise _stale(label_id, expected_version, conn)
        _add_revision(conn, label=before, version=before.version + 1, action="withdraw",
                      actor=actor, before=snapshot(before), after=None)

    durable_write(engine, job)
