"""/api/v1 label scores: score a label (a person's or a draft) on request with the server's model,
and see its scores."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from app.api.autointerp_schemas import ScoreIn
from app.api.deps import AnnotatorUser, SaeIdPath, run_read
from app.api.label_schemas import READ, WRITE, ScoredLabelOut
from app.api.label_scorer import LabelScorerDep
from app.api.schemas import ErrorOut
from app.errors import ConflictError, NotFoundError
from app.store import labels as store
from app.store.read_models import LabelInfo, ScoreInfo
from app.store.tables import SCORE_METHODS

router = APIRouter(prefix="/api/v1", tags=["labels"])

IndexPath = Annotated[int, Path(ge=0, le=2**31 - 1, description="Feature index, 0..d_sae-1")]
LabelIdPath = Annotated[int, Path(ge=1, le=2**63 - 1, description="The label's id")]


def _err(description: str) -> dict:
    return {"model": ErrorOut, "description": description}


SCORE_RESPONSES = {
    **READ,
    409: _err("The label has no text, or this server's model cannot score this SAE (another "
              "model, the SAE not loaded, a prompt longer than its context)"),
    412: _err("The label was edited while it was being scored (nothing stored)"),
    413: WRITE[413],
    503: _err("No model loaded, the model still loading, or busy (Retry-After)"),
}


@router.post("/saes/{sae_id}/features/{index}/labels/{label_id}/score",
             response_model=ScoredLabelOut, responses=SCORE_RESPONSES,
             summary="Score a label: how well it predicts where the feature fires")
async def score_label(request: Request, user: AnnotatorUser, sae_id: SaeIdPath,
                      index: IndexPath, label_id: LabelIdPath, scorer: LabelScorerDep,
                      body: ScoreIn | None = None) -> ScoredLabelOut:
    """Detection (the scorer reads the description and says which windows activate, among
    activating windows and windows where the feature is zero) and fuzzing (which windows have
    their strongest tokens marked), each a balanced accuracy with a random-explanation
    control beside it, scored by the server's loaded model and stored with the label version.
    Takes tens of seconds on a CPU; one label at a time per server (503 + Retry-After)."""
    body = body or ScoreIn()

    def read_label(session) -> LabelInfo | None:  # noqa: ANN001 - a Session
        return store.label_by_id(session=session, label_id=label_id)

    label = await run_read(request, read_label)
    if label is None or label.sae_id != sae_id or label.feature_index != index:
        raise NotFoundError(f"no label {label_id} on feature {index} of {sae_id}")
    if not label.description.strip():
        # The label's state, not the request, is the problem (it may get a text later).
        raise ConflictError(f"label {label_id} has no description to score")
    methods = [m for m in SCORE_METHODS if m in body.methods]
    await scorer.score(label=label, methods=methods, seed=body.seed)

    def read_scored(session) -> tuple[LabelInfo | None, list[ScoreInfo]]:  # noqa: ANN001
        now = store.label_by_id(session=session, label_id=label_id)
        return now, store.scores_of(session=session, label_ids=[label_id]).get(label_id, [])

    now, scores = await run_read(request, read_scored)
    if now is None:
        raise NotFoundError(f"label {label_id} was withdrawn meanwhile")
    return ScoredLabelOut.scored(now, scores)
