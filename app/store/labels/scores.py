"""Automatic labels and label scores: an explainer's draft written with its scores in one
transaction, scores of any label (a person's too), and which features an explainer has finished.

A score describes the text it scored: it stays a label's current score while the label's
description is the one it had at the scored version (a review or a tag edit bumps the version and
keeps it; an edit of the text does not).

An explainer writes as author `autointerp:<explainer>` (author_kind 'automatic', status draft), so
it never touches a person's label, and automatic labels are not shown until a reviewer accepts
one (labels/reads.py). A rerun rewrites its own draft as a new revision (or keeps the version
when the text is unchanged); a draft a reviewer has already moved on (accepted, rejected, needs
review) is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement, Subquery

from app.errors import ConfigError, NotFoundError
from app.store.db import write_session
from app.store.labels.edits import MAX_DESCRIPTION, check_author
from app.store.labels.reads import label_info
from app.store.labels.writes import _add_revision, _stale, snapshot
from app.store.read_models import LabelInfo, ScoreInfo
from app.store.tables import (
    SCORE_METHODS,
    Label,
    LabelExplanation,
    LabelRevision,
    LabelScore,
    as_utc,
    utcnow,
)

AUTOMATIC_PREFIX = "autointerp:"
_label_t = Label.__table__
_score_t = LabelScore.__table__
_expl_t = LabelExplanation.__table__
_rev_t = LabelRevision.__table__


def automatic_author(explainer: str) -> str:
    """The author name of an explainer's drafts, e.g. 'autointerp:pattern'."""
    return f"{AUTOMATIC_PREFIX}{explainer}"


@dataclass(frozen=True)
class ScoreRecord:
    """A score to store: `score`/`control_score` are balanced accuracies (None: not measured)."""

    method: str
    scorer: str
    score: float | None
    control_score: float | None
    n_windows: int
    seed: int
    run_id: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SavedExplanation:
    """What save_explanation did: 'created', 'updated' (a new revision), 'unchanged' (same text,
    same version: only the explanation record and scores were written) or 'kept' (the draft was
    reviewed meanwhile; nothing written)."""

    label: LabelInfo
    action: str


def _check_scores(scores: list[ScoreRecord]) -> None:
    for s in scores:
        if s.method not in SCORE_METHODS:
            raise ConfigError(f"score method {s.method!r}: use one of {', '.join(SCORE_METHODS)}")


def _write_scores(session: Session, *, label_id: int, version: int,
                  scores: list[ScoreRecord]) -> None:
    """Insert scores for one label version, replacing any with the same method, scorer, seed."""
    now = utcnow()
    for s in scores:
        session.execute(delete(LabelScore).where(
            LabelScore.label_id == label_id, LabelScore.label_version == version,
            LabelScore.method == s.method, LabelScore.scorer == s.scorer,
            LabelScore.seed == s.seed))
        session.execute(insert(LabelScore).values(
            label_id=label_id, label_version=version, method=s.method, scorer=s.scorer,
            score=s.score, control_score=s.control_score, n_windows=s.n_windows, seed=s.seed,
            run_id=s.run_id, created_at=now, details=s.details))


def save_explanation(
    engine: Engine, *, sae_id: str, index: int, explainer: str, description: str, seed: int,
    run_id: int | None, scores: list[ScoreRecord], details: dict[str, Any] | None = None,
) -> SavedExplanation:
    """Write an explainer's draft of one feature and its scores, all or nothing."""
    author = automatic_author(explainer)
    check_author(author, "automatic")
    if not description or len(description) > MAX_DESCRIPTION or "\x00" in description:
        raise ConfigError(f"an explanation must be 1-{MAX_DESCRIPTION} characters without NUL")
    _check_scores(scores)
    now = utcnow()
    with write_session(engine, durable=True) as session:
        row = session.execute(select(_label_t).where(
            _label_t.c.sae_id == sae_id, _label_t.c.feature_index == index,
            _label_t.c.author_kind == "automatic", _label_t.c.author == author)).first()
        if row is None:
            row = session.execute(insert(Label).values(
                sae_id=sae_id, feature_index=index, author=author, author_kind="automatic",
                user_id=None, description=description, tags=[], status="draft",
                confidence=None, notes="", version=1, reviewed_by=None, created_at=now,
                updated_at=now).returning(_label_t)).one()
            label, action = label_info(row), "created"
            _add_revision(session, label=label, version=1, action="create", actor=author,
                          before=None, after=snapshot(label))
        elif row.status != "draft":
            return SavedExplanation(label_info(row), "kept")
        elif row.description == description:
            label, action = label_info(row), "unchanged"
        else:
            before = label_info(row)
            updated = session.execute(
                update(Label).where(Label.id == row.id, Label.version == row.version)
                .values(description=description, version=Label.version + 1, updated_at=now)
                .returning(_label_t)).first()
            if updated is None:
                raise _stale(row.id, row.version, session)
            label, action = label_info(updated), "updated"
            _add_revision(session, label=label, version=label.version, action="edit",
                          actor=author, before=snapshot(before), after=snapshot(label))
        session.execute(delete(LabelExplanation).where(LabelExplanation.label_id == label.id))
        session.execute(insert(LabelExplanation).values(
            label_id=label.id, explainer=explainer, seed=seed, run_id=run_id,
            label_version=label.version, created_at=now, details=details or {}))
        _write_scores(session, label_id=label.id, version=label.version, scores=scores)
    return SavedExplanation(label, action)


def save_scores(engine: Engine, *, label_id: int, expected_version: int,
                scores: list[ScoreRecord]) -> None:
    """Store scores of any label (a person's too) for the version that was scored; a label
    edited or withdrawn meanwhile is PreconditionFailedError (its new text was not scored)."""
    _check_scores(scores)
    with write_session(engine, durable=True) as session:
        version = session.scalar(select(Label.version).where(Label.id == label_id))
        if version is None:
            raise NotFoundError(f"no label {label_id}")
        if version != expected_version:
            raise _stale(label_id, expected_version, session)
        _write_scores(session, label_id=label_id, version=version, scores=scores)


def score_info(row: Any) -> ScoreInfo:
    return ScoreInfo(label_id=row.label_id, label_version=row.label_version, method=row.method,
                     scorer=row.scorer, score=row.score, control_score=row.control_score,
                     n_windows=row.n_windows, seed=row.seed, run_id=row.run_id,
                     created_at=as_utc(row.created_at), details=row.details or {})


def score_is_current(score: Any = _score_t.c, label: Any = _label_t.c) -> ColumnElement[bool]:
    """SQL, with `score` joined to its `label`: the score describes the label's current text (it
    scored the current version, or a version whose description, per its revision, is the
    current one)."""
    scored = _rev_t.alias("scored")
    same_text = exists().where(
        scored.c.label_id == score.label_id, scored.c.version == score.label_version,
        scored.c.after["description"].as_string() == label.description)
    return or_(score.label_version == label.version, same_text)


def scores_of(*, session: Session, label_ids: list[int], current_only: bool = True
              ) -> dict[int, list[ScoreInfo]]:
    """Scores by label id, newest first; `current_only`: only those of each label's current text
    (score_is_current), one per method, scorer and seed (the newest)."""
    if not label_ids:
        return {}
    stmt = select(_score_t).where(_score_t.c.label_id.in_(label_ids))
    if current_only:
        stmt = stmt.join(_label_t, _label_t.c.id == _score_t.c.label_id).where(
            score_is_current())
    out: dict[int, list[ScoreInfo]] = {}
    seen: set[tuple] = set()
    for row in session.execute(stmt.order_by(_score_t.c.id.desc())):
        key = (row.label_id, row.method, row.scorer, row.seed)
        if current_only and key in seen:
            continue
        seen.add(key)
        out.setdefault(row.label_id, []).append(score_info(row))
    return out


def draft_scores(sae_id: str) -> Subquery:
    """SQL (feature_index, score): one row per feature of `sae_id` with an automatic draft (status
    draft); score: its best draft's, a draft's being the mean of its current measured scores
    (null when none is measured)."""
    per_draft = (
        select(_label_t.c.feature_index, func.avg(_score_t.c.score).label("score"))
        .select_from(_label_t.outerjoin(_score_t, and_(
            _score_t.c.label_id == _label_t.c.id, _score_t.c.score.is_not(None),
            score_is_current())))
        .where(_label_t.c.sae_id == sae_id, _label_t.c.author_kind == "automatic",
               _label_t.c.status == "draft")
        .group_by(_label_t.c.feature_index, _label_t.c.id).subquery("per_draft"))
    return (select(per_draft.c.feature_index, func.max(per_draft.c.score).label("score"))
            .group_by(per_draft.c.feature_index).subquery("draft_scores"))


def explained_features(*, session: Session, sae_id: str, explainer: str, seed: int,
                       methods: list[str], scorer: str | None) -> tuple[set[int], set[int]]:
    """(finished, reviewed) feature indices of this explainer on this SAE.

    Finished: its draft's current text came from this explainer with this seed and has a score
    for every method by this scorer and seed. Reviewed: its draft is no longer a draft (a
    reviewer accepted, rejected or flagged it), so a rerun leaves it alone.
    """
    author = automatic_author(explainer)
    rows = session.execute(
        select(_label_t.c.id, _label_t.c.feature_index, _label_t.c.status, _label_t.c.version,
               _expl_t.c.seed, _expl_t.c.label_version)
        .select_from(_label_t.outerjoin(_expl_t, _expl_t.c.label_id == _label_t.c.id))
        .where(_label_t.c.sae_id == sae_id, _label_t.c.author_kind == "automatic",
               _label_t.c.author == author)).all()
    reviewed = {r.feature_index for r in rows if r.status != "draft"}
    current = {r.id: r for r in rows if r.status == "draft" and r.seed == seed
               and r.label_version == r.version}
    if not methods:
        return {r.feature_index for r in current.values()}, reviewed
    have: dict[int, set[str]] = {}
    for label_id, version, method in session.execute(
            select(_score_t.c.label_id, _score_t.c.label_version, _score_t.c.method)
            .join(_label_t, _label_t.c.id == _score_t.c.label_id)
            .where(_label_t.c.sae_id == sae_id, _label_t.c.author == author,
                   _score_t.c.scorer == scorer, _score_t.c.seed == seed)):
        if label_id in current and current[label_id].version == version:
            have.setdefault(label_id, set()).add(method)
    finished = {r.feature_index for lid, r in current.items()
                if set(methods) <= have.get(lid, set())}
    return finished, reviewed
