"""Wire schemas of the labeling API: label in/out, revisions, review, queue, search, progress."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.api.autointerp_schemas import ScoreOut
from app.api.deps import NO_NUL
from app.api.schemas import ErrorOut
from app.store.labels import MAX_DESCRIPTION, MAX_NOTES, MAX_TAGS
from app.store.read_models import LabelHit, LabelInfo, RevisionInfo, ScoreInfo

Status = Literal["draft", "needs_review", "accepted", "rejected"]


def etag(label: LabelInfo) -> str:
    """A label's own ETag: its id and version (a withdrawn and re-created label has a new id)."""
    return f'"{label.id}-{label.version}"'


# What a tag may be as sent: letters, digits, _ . : - and spaces, starting (after spaces) with a
# letter or digit; the store lowercases it and turns inner spaces into dashes. Only ASCII
# whitespace, written out, so the schema and the server agree on what \s means.
TAG_INPUT = r"^[ \t\n\r]*[A-Za-z0-9][A-Za-z0-9_.:\- \t\n\r]*$"
Tag = Annotated[str, Field(max_length=64, pattern=TAG_INPUT)]


class LabelIn(BaseModel):
    """My label of a feature. Tags are stored lowercase, inner spaces as dashes."""

    # Strict: false is not a confidence of 0, nor "0.5" a number.
    model_config = ConfigDict(strict=True)

    description: str = Field("", max_length=MAX_DESCRIPTION, pattern=NO_NUL)
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    status: Status = "draft"
    confidence: float | None = Field(None, ge=0.0, le=1.0)
    notes: str = Field("", max_length=MAX_NOTES, pattern=NO_NUL)


class LabelOut(BaseModel):
    id: int
    sae_id: str
    feature_index: int
    author: str
    author_kind: Literal["person", "automatic"]
    description: str
    tags: list[str]
    status: str
    confidence: float | None
    notes: str
    version: int
    reviewed_by: str | None
    created_at: datetime | None
    updated_at: datetime
    etag: str = Field(description="The value for If-Match on the next write of this label")

    @classmethod
    def of(cls, label: LabelInfo) -> LabelOut:
        return cls(id=label.id, sae_id=label.sae_id, feature_index=label.feature_index,
                   author=label.author, author_kind=label.author_kind,  # type: ignore[arg-type]
                   description=label.description, tags=label.tags, status=label.status,
                   confidence=label.confidence, notes=label.notes, version=label.version,
                   reviewed_by=label.reviewed_by, created_at=label.created_at,
                   updated_at=label.updated_at, etag=etag(label))


class ScoredLabelOut(LabelOut):
    """A label with the scores of its current text (detection, fuzzing; each with its
    random-explanation control)."""

    scores: list[ScoreOut]

    @classmethod
    def scored(cls, label: LabelInfo, scores: list[ScoreInfo]) -> ScoredLabelOut:
        return cls(**LabelOut.of(label).model_dump(), scores=[ScoreOut.of(s) for s in scores])


class FeatureLabelsOut(BaseModel):
    """Everyone's labels of one feature, automatic drafts included; the first is the one the
    feature shows, if any (a draft never is until a reviewer accepts it)."""

    data: list[ScoredLabelOut]
    shown_id: int | None


class RevisionOut(BaseModel):
    id: int
    label_id: int
    version: int
    action: Literal["create", "edit", "review", "withdraw", "import"]
    actor: str
    created_at: datetime
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    @classmethod
    def of(cls, r: RevisionInfo) -> RevisionOut:
        return cls(id=r.id, label_id=r.label_id, version=r.version,
                   action=r.action,  # type: ignore[arg-type]
                   actor=r.actor, created_at=r.created_at, before=r.before, after=r.after)


class HistoryOut(BaseModel):
    data: list[RevisionOut]


class ReviewIn(BaseModel):
    model_config = ConfigDict(strict=True)

    status: Status


class QueueItemOut(BaseModel):
    sae_id: str
    index: int
    lease_expires_at: datetime


class SearchHitOut(BaseModel):
    label: LabelOut
    score: float

    @classmethod
    def of(cls, hit: LabelHit) -> SearchHitOut:
        return cls(label=LabelOut.of(hit.label), score=hit.score)


class SearchOut(BaseModel):
    data: list[SearchHitOut]


class ProgressRow(BaseModel):
    author: str
    total: int
    draft: int = 0
    needs_review: int = 0
    accepted: int = 0
    rejected: int = 0


class ProgressOut(BaseModel):
    sae_id: str
    d_sae: int
    labeled: int = Field(description="Features with a shown label")
    people: list[ProgressRow]


class ImportOut(BaseModel):
    imported: int


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorOut, "description": description}


AUTH = {401: _err("Not signed in, or an unknown token"),
        403: _err("This role may not do that, or a cross-site request")}
READ = {**AUTH, 404: _err("Unknown SAE, feature or label"), 422: _err("Invalid input")}
WRITE = {**READ, 412: _err("Stale If-Match, or If-None-Match: * and the label exists"),
         413: _err("Request body over this endpoint's limit"),
         428: _err("The label exists and the request has no If-Match")}
