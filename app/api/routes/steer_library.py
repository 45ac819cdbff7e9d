"""/api/v1/steer/runs and /api/v1/steer/vectors: saved steering runs (a shareable record of a
generation; opening one re-runs nothing) and saved contrastive steering vectors."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    NO_NUL,
    CurrentUser,
    EngineStateDep,
    ModelWorkerDep,
    SessionDep,
    run_read,
    text_query,
)
from app.api.schemas import ErrorOut
from app.api.steer_schemas import (
    LIBRARY_MAX_BODY_BYTES,
    AlignedFeature,
    RunBrief,
    RunIn,
    RunList,
    RunOut,
    SteerIn,
    VectorCreate,
    VectorList,
    VectorOut,
)
from app.errors import ConflictError
from app.store import queries
from app.store import steering as saved
from app.store.db import write_session
from app.store.read_models import SteerRunInfo, SteerVectorInfo

router = APIRouter(prefix="/api/v1/steer", tags=["steer"])
MAX_BODY_BYTES = LIBRARY_MAX_BODY_BYTES

NOT_FOUND = {404: {"model": ErrorOut, "description": "No such run or vector"}}
INVALID = {422: {"model": ErrorOut, "description": "Invalid input"}}
TOO_LARGE = {413: {"model": ErrorOut, "description": "Request body over this endpoint's limit"}}
FORBIDDEN = {403: {"model": ErrorOut, "description": "Only the author may delete it"}}
VECTOR_CREATE_RESPONSES = {
    **INVALID,
    **TOO_LARGE,
    404: {"model": ErrorOut, "description": "Unknown SAE, or one this server did not load"},
    409: {"model": ErrorOut, "description": "A vector of that name exists"},
    503: {"model": ErrorOut, "description": "Model queue full or model not loaded (Retry-After)"},
}


def _run_out(run: SteerRunInfo) -> RunOut:
    return RunOut(id=run.id, name=run.name, sae_id=run.sae_id, author=run.author,
                  created_at=run.created_at, request=SteerIn.model_validate(run.request),
                  default_text=run.default_text, steered_text=run.steered_text)


@router.get("/runs", response_model=RunList, responses=INVALID)
def list_runs(session: SessionDep, sae_id: Annotated[
        str | None, text_query(200, "Only the runs of this SAE")] = None) -> RunList:
    runs = saved.list_runs(session=session, sae_id=sae_id)
    return RunList(data=[RunBrief(id=r.id, name=r.name, sae_id=r.sae_id, author=r.author,
                                  created_at=r.created_at) for r in runs], count=len(runs))


@router.post("/runs", response_model=RunOut, status_code=201,
             responses={**INVALID, **TOO_LARGE,
                        404: {"model": ErrorOut, "description": "Unknown SAE"}})
def save_run(body: RunIn, request: Request, user: CurrentUser) -> RunOut:
    """Save a generation (its request and both texts) by name; its id makes its URL."""
    with write_session(request.app.state.db_engine, durable=True) as session:
        queries.get_sae_brief(session=session, sae_id=body.request.sae_id)  # 404 if unknown
        run = saved.save_run(session=session, name=body.name, sae_id=body.request.sae_id,
                             request=body.request.model_dump(mode="json"),
                             default_text=body.default_text, steered_text=body.steered_text,
                             author=user.name)
    return _run_out(run)


RunId = Annotated[int, Path(ge=1, le=2**62)]


@router.get("/runs/{run_id}", response_model=RunOut, responses={**NOT_FOUND, **INVALID})
def get_run(session: SessionDep, run_id: RunId) -> RunOut:
    return _run_out(saved.get_run(session=session, run_id=run_id))


@router.delete("/runs/{run_id}", status_code=204,
               responses={**NOT_FOUND, **INVALID, **FORBIDDEN})
def delete_run(request: Request, run_id: RunId, user: CurrentUser) -> Response:
    with write_session(request.app.state.db_engine, durable=True) as session:
        saved.delete_run(session=session, run_id=run_id, author=user.name)
    return Response(status_code=204)


# --- vectors --------------------------------------------------------------------------------------


def _vector_out(session: Session, vector: SteerVectorInfo) -> VectorOut:
    labels = queries.get_labels(session=session, sae_id=vector.sae_id,
                                indices=[a["index"] for a in vector.aligned])
    aligned = [AlignedFeature(index=a["index"], cosine=a["cosine"],
                              label=getattr(labels.get(a["index"]), "description", None) or None)
               for a in vector.aligned]
    return VectorOut(name=vector.name, sae_id=vector.sae_id, hook_name=vector.hook_name,
                     position=vector.position, positive=vector.positive,
                     negative=vector.negative, norm=vector.norm, aligned=aligned,
                     author=vector.author, created_at=vector.created_at)


@router.get("/vectors", response_model=VectorList, responses=INVALID)
def list_vectors(session: SessionDep, sae_id: Annotated[
        str | None, text_query(200, "Only the vectors read at this SAE's hook")] = None,
                 ) -> VectorList:
    vectors = [_vector_out(session, v) for v in saved.list_vectors(session=session,
                                                                   sae_id=sae_id)]
    return VectorList(data=vectors, count=len(vectors))


VectorName = Annotated[str, Path(min_length=1, max_length=200, pattern=NO_NUL)]


@router.get("/vectors/{name}", response_model=VectorOut, responses={**NOT_FOUND, **INVALID})
def get_vector(session: SessionDep, name: VectorName) -> VectorOut:
    return _vector_out(session, saved.get_vectors(session=session, names=[name])[name])


@router.post("/vectors", response_model=VectorOut, status_code=201,
             responses=VECTOR_CREATE_RESPONSES)
async def create_vector(body: VectorCreate, request: Request, user: CurrentUser,
                        worker: ModelWorkerDep, engine_state: EngineStateDep) -> VectorOut:
    """Contrastive activation addition: the mean activation at the SAE's hook over the positive
    prompts minus that over the negative ones, saved by name, with the SAE's features whose
    decoder rows are most aligned with it."""
    def check(session: Session) -> None:
        queries.get_sae_brief(session=session, sae_id=body.sae_id)  # 404 if unknown
        if saved.vector_exists(session=session, name=body.name):  # before the model runs
            raise ConflictError(f"a steering vector named {body.name!r} exists; pick another "
                                "name or delete it first")

    await run_read(request, check)
    service = engine_state.require()
    made = await worker.run(lambda: service.caa_vector(
        sae_id=body.sae_id, positive=body.positive, negative=body.negative,
        position=body.position))

    def save() -> VectorOut:
        with write_session(request.app.state.db_engine, durable=True) as session:
            vector = saved.save_vector(
                session=session, name=body.name, sae_id=body.sae_id, hook_name=made["hook_name"],
                position=body.position, positive=body.positive, negative=body.negative,
                vector=made["vector"], norm=made["norm"], aligned=made["aligned"],
                author=user.name)
            return _vector_out(session, vector)

    return await run_in_threadpool(save)


@router.delete("/vectors/{name}", status_code=204,
               responses={**NOT_FOUND, **INVALID, **FORBIDDEN})
def delete_vector(request: Request, name: VectorName, user: CurrentUser) -> Response:
    with write_session(request.app.state.db_engine, durable=True) as session:
        saved.delete_vector(session=session, name=name, author=user.name)
    return Response(status_code=204)
