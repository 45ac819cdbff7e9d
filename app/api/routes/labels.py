"""/api/v1 labeling: my label of a feature (ETag / If-Match), everyone's labels, history,
review, the queue, label search, progress, import and export."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Body, Header, Path, Query, Request, Response

from app.api.deps import (
    AdminUser,
    AnnotatorUser,
    CurrentUser,
    ReviewerUser,
    SaeIdPath,
    SessionDep,
    text_query,
)
from app.api.label_schemas import (
    AUTH,
    READ,
    WRITE,
    FeatureLabelsOut,
    HistoryOut,
    ImportOut,
    LabelIn,
    LabelOut,
    ProgressOut,
    ProgressRow,
    QueueItemOut,
    ReviewIn,
    ScoredLabelOut,
    SearchHitOut,
    SearchOut,
    etag,
)
from app.errors import (
    ForbiddenError,
    NotFoundError,
    PreconditionFailedError,
    PreconditionRequiredError,
)
from app.store import labels as store
from app.store import queries
from app.store.db import read_session
from app.store.read_models import LabelInfo

router = APIRouter(prefix="/api/v1", tags=["labels"])
# Import and export: their own router for a larger body limit (a whole label file).
transfer_router = APIRouter(prefix="/api/v1", tags=["labels"])
IMPORT_MAX_BYTES = 64 * 1024 * 1024

IndexPath = Annotated[int, Path(ge=0, le=2**31 - 1, description="Feature index, 0..d_sae-1")]
# Typed str, not str | None (routes default them to None): a header is absent or text, and an
# OpenAPI "null" alternative would invite clients (and fuzzers) to send the word null.
IfMatch = Annotated[str, Header(description="The label's ETag (edits, withdraw)")]
IfNoneMatch = Annotated[str, Header(description="'*' to create my label")]
FEATURE = "/saes/{sae_id}/features/{index}"
# Statuses only a review sets; an annotator writes draft or needs_review.
REVIEWED = ("accepted", "rejected")


def _check_feature(request: Request, sae_id: str, index: int) -> None:
    with read_session(request.app.state.db_engine) as session:
        sae = queries.get_sae_brief(session=session, sae_id=sae_id)
    if index >= sae.d_sae:
        raise NotFoundError(f"index: SAE {sae_id} has features 0..{sae.d_sae - 1}, not {index}")


def _mine(request: Request, *, sae_id: str, index: int, author: str) -> LabelInfo | None:
    with read_session(request.app.state.db_engine) as session:
        return store.own_label(session=session, sae_id=sae_id, index=index, author=author)


def _version_from(if_match: str, label: LabelInfo) -> int:
    """The version an If-Match names; a tag of another label (or garbage) is stale."""
    for candidate in if_match.split(","):
        tag = candidate.strip().removeprefix("W/").strip('"')
        label_id, _, version = tag.partition("-")
        if label_id == str(label.id) and version.isdigit():
            return int(version)
    raise PreconditionFailedError(
        f"If-Match {if_match[:80]!r} is not this label's version (now {etag(label)}); reload, "
        "merge and save again")


def _labeled(response: Response, label: LabelInfo) -> LabelOut:
    response.headers["ETag"] = etag(label)
    return LabelOut.of(label)


@router.get(FEATURE + "/label", response_model=LabelOut, responses=READ,
            summary="My label of a feature")
def get_my_label(request: Request, response: Response, user: CurrentUser, sae_id: SaeIdPath,
                 index: IndexPath) -> LabelOut:
    _check_feature(request, sae_id, index)
    label = _mine(request, sae_id=sae_id, index=index, author=user.name)
    if label is None:
        raise NotFoundError(f"you have no label on feature {index} of {sae_id}; create one "
                            "with PUT and If-None-Match: *")
    return _labeled(response, label)


@router.put(FEATURE + "/label", response_model=LabelOut, responses={
    **WRITE, 201: {"model": LabelOut, "description": "Created"}}, summary="Create or edit my label")
def put_my_label(
    request: Request, response: Response, user: AnnotatorUser, sae_id: SaeIdPath, index: IndexPath,
    body: LabelIn, if_match: IfMatch = None, if_none_match: IfNoneMatch = None,
) -> LabelOut:
    """Create my label with `If-None-Match: *` (412 if I have one by then); edit it with
    `If-Match: <its ETag>` (412 if it changed since, 428 without the header)."""
    _check_feature(request, sae_id, index)
    if body.status in REVIEWED and not user.can("reviewer"):
        raise ForbiddenError(f"status: {body.status} is a reviewer's verdict (POST .../labels/"
                             "{id}/review); write draft or needs_review")
    engine = request.app.state.db_engine
    edit = store.LabelEdit(description=body.description, tags=body.tags, status=body.status,
                           confidence=body.confidence, notes=body.notes)
    if if_match is None:
        existing = _mine(request, sae_id=sae_id, index=index, author=user.name)
        if existing is not None and if_none_match is not None and (
                if_none_match.strip() == "*" or etag(existing) in if_none_match):
            raise PreconditionFailedError(
                f"you have a label on this feature ({etag(existing)}); edit it with If-Match")
        if existing is not None:
            raise PreconditionRequiredError(
                f"you have a label on this feature ({etag(existing)}); send If-Match with its "
                "ETag so a concurrent edit is not overwritten")
        label = store.create_label(engine, sae_id=sae_id, index=index, author=user.name,
                                   user_id=user.user_id, edit=edit)
        response.status_code = 201
        return _labeled(response, label)
    current = _mine(request, sae_id=sae_id, index=index, author=user.name)
    if current is None:
        raise PreconditionFailedError("If-Match: you have no label on this feature (withdrawn "
                                      "meanwhile?); create one with If-None-Match: *")
    label = store.update_label(engine, label_id=current.id,
                               expected_version=_version_from(if_match, current), edit=edit,
                               actor=user.name)
    return _labeled(response, label)


@router.delete(FEATURE + "/label", status_code=204, responses=WRITE,
               summary="Withdraw my label (its history stays)")
def withdraw_my_label(request: Request, user: AnnotatorUser, sae_id: SaeIdPath, index: IndexPath,
                      if_match: IfMatch = None) -> Response:
    _check_feature(request, sae_id, index)
    current = _mine(request, sae_id=sae_id, index=index, author=user.name)
    if current is None:
        raise NotFoundError(f"you have no label on feature {index} of {sae_id}")
    if if_match is None:
        raise PreconditionRequiredError(f"send If-Match: {etag(current)} to withdraw it")
    store.withdraw_label(request.app.state.db_engine, label_id=current.id,
                         expected_version=_version_from(if_match, current), actor=user.name)
    return Response(status_code=204)


@router.get(FEATURE + "/labels", response_model=FeatureLabelsOut, responses=READ,
            summary="Everyone's labels of a feature, the shown one first")
def feature_labels(request: Request, session: SessionDep, user: CurrentUser, sae_id: SaeIdPath,
                   index: IndexPath) -> FeatureLabelsOut:
    _check_feature(request, sae_id, index)
    labels = store.feature_labels(session=session, sae_id=sae_id, index=index)
    shown = store.pick_shown(labels)
    scores = store.scores_of(session=session, label_ids=[lb.id for lb in labels])
    return FeatureLabelsOut(data=[ScoredLabelOut.scored(lb, scores.get(lb.id, []))
                                  for lb in labels], shown_id=shown.id if shown else None)


@router.get(FEATURE + "/labels/history", response_model=HistoryOut, responses=READ,
            summary="Every revision of the feature's labels, newest first")
def feature_history(request: Request, session: SessionDep, user: CurrentUser, sae_id: SaeIdPath,
                    index: IndexPath) -> HistoryOut:
    from app.api.label_schemas import RevisionOut

    _check_feature(request, sae_id, index)
    revisions = store.feature_history(session=session, sae_id=sae_id, index=index)
    return HistoryOut(data=[RevisionOut.of(r) for r in revisions])


@router.post(FEATURE + "/labels/{label_id}/review", response_model=LabelOut,
             responses={**READ, 412: WRITE[412], 428: WRITE[428]},
             summary="Accept, reject or send back a label")
def review(request: Request, response: Response, user: ReviewerUser, sae_id: SaeIdPath,
           index: IndexPath, label_id: Annotated[int, Path(ge=1, le=2**63 - 1)], body: ReviewIn,
           if_match: IfMatch = None) -> LabelOut:
    """A verdict on the version the reviewer read: `If-Match` with the label's ETag (412 if it
    changed since, 428 without), so nobody accepts a text they have not seen."""
    with read_session(request.app.state.db_engine) as session:
        label = store.label_by_id(session=session, label_id=label_id)
    if label is None or label.sae_id != sae_id or label.feature_index != index:
        raise NotFoundError(f"no label {label_id} on feature {index} of {sae_id}")
    if if_match is None:
        raise PreconditionRequiredError(f"send If-Match: {etag(label)} (the version you "
                                        "reviewed) so an edit made meanwhile is not accepted")
    done = store.review_label(request.app.state.db_engine, label_id=label_id,
                              status=body.status, reviewer=user.name,
                              expected_version=_version_from(if_match, label))
    return _labeled(response, done)


# --- queue and progress ------------------------------------------------------------------------


@router.post("/saes/{sae_id}/queue/next", response_model=QueueItemOut,
             responses={**READ, 204: {"description": "Nothing left to label"}},
             summary="Lease the next feature to label (or review)")
def queue_next(
    request: Request, user: AnnotatorUser, sae_id: SaeIdPath,
    order: store.QueueOrder = "index",
    seed: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    mode: Literal["unlabeled", "review"] = "unlabeled",
) -> QueueItemOut | Response:
    """`unlabeled`: features without a shown label; `review` (reviewers): features with a label
    by someone else that waits for a verdict, automatic drafts included. Orders: `index`,
    `density`, `active` (max activation), `random` (a fixed permutation per `seed`),
    `draft_lowest` (features with an automatic draft, the lowest scored first: a person should
    describe them) and `draft_highest` (the highest scored first, to accept); a draft's score is
    the mean of its detection and fuzzing scores, and drafts without one come last. The feature
    is leased to you for five minutes; asking again releases it."""
    if mode == "review" and not user.can("reviewer"):
        raise ForbiddenError(f"mode: review is for reviewers; {user.name} is a {user.role}")
    got = store.next_feature(request.app.state.db_engine, sae_id=sae_id, user=user.name,
                             order=order, seed=seed, mode=mode)
    if got is None:
        return Response(status_code=204)
    index, expires = got
    return QueueItemOut(sae_id=sae_id, index=index, lease_expires_at=expires)


@router.post("/saes/{sae_id}/queue/{index}/skip", status_code=204, responses=READ,
             summary="Skip a feature: the queue does not offer it to me again")
def queue_skip(request: Request, user: AnnotatorUser, sae_id: SaeIdPath,
               index: IndexPath) -> Response:
    _check_feature(request, sae_id, index)
    store.skip_feature(request.app.state.db_engine, sae_id=sae_id, index=index, user=user.name)
    return Response(status_code=204)


@router.get("/saes/{sae_id}/labels/progress", response_model=ProgressOut, responses=READ,
            summary="Labeled features and labels per person on one SAE")
def progress(session: SessionDep, user: CurrentUser, sae_id: SaeIdPath) -> ProgressOut:
    sae = queries.get_sae(session=session, sae_id=sae_id)
    people = [ProgressRow(**row) for row in store.progress(session=session, sae_id=sae_id)]
    return ProgressOut(sae_id=sae_id, d_sae=sae.d_sae, labeled=sae.n_labeled, people=people)


# --- search, import, export ----------------------------------------------------------------------


@router.get("/labels/search", response_model=SearchOut, responses=READ,
            summary="Full-text search over label descriptions, tags and notes")
def search(
    session: SessionDep, user: CurrentUser,
    q: Annotated[str, text_query(200, "Words; the last one is a prefix")] = "",
    tag: Annotated[str | None, text_query(64, "Only labels with this tag")] = None,
    sae_id: Annotated[str | None, text_query(200, "Only this SAE's labels")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> SearchOut:
    hits = store.search_labels(session=session, q=q, tag=tag, sae_id=sae_id, limit=limit)
    return SearchOut(data=[SearchHitOut.of(h) for h in hits])


_MEDIA = {"jsonl": "application/x-ndjson", "csv": "text/csv", "neuronpedia": "application/json"}


@transfer_router.get("/labels/export", response_class=Response, responses={
    **AUTH, 422: READ[422], 200: {"content": {m: {} for m in _MEDIA.values()},
                                  "description": "The export file"}},
    summary="Export labels with history (admin)")
def export(
    session: SessionDep, user: AdminUser,
    format: Literal["jsonl", "csv", "neuronpedia"] = "jsonl",  # noqa: A002 - public name
    sae_id: Annotated[str | None, text_query(200, "Only this SAE's labels")] = None,
) -> Response:
    text = store.export_text(session=session, fmt=format, sae_id=sae_id)
    suffix = {"jsonl": "jsonl", "csv": "csv", "neuronpedia": "json"}[format]
    return Response(text, media_type=_MEDIA[format], headers={
        "Content-Disposition": f'attachment; filename="labels.{suffix}"'})


@transfer_router.post(
    "/labels/import", response_model=ImportOut,
    responses={**AUTH, 422: READ[422], 413: WRITE[413]},
    summary="Import labels with history (admin); all or nothing; up to 64 MiB")
def import_labels(
    request: Request, user: AdminUser,
    body: Annotated[str, Body(media_type="text/plain",
                              description="The file from export (jsonl or csv)")],
    format: Literal["jsonl", "csv"] = "jsonl",  # noqa: A002 - public name
) -> ImportOut:
    n = store.import_records(request.app.state.db_engine, store.parse(body, format))
    return ImportOut(imported=n)
