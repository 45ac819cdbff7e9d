"""/api/v1/saes: SAEs with their run statistics (home page and SAE overview)."""

from __future__ import annotations

from fastapi import APIRouter, Query

from app.api.autointerp_schemas import AutointerpOut
from app.api.deps import NO_NUL, SaeIdPath, SessionDep, SettingsDep
from app.api.schemas import ERROR_RESPONSES, VALIDATION_RESPONSES, SAEDetail, SAEList, SAEOut
from app.store import queries
from app.store.labels import autointerp_summary

router = APIRouter(prefix="/api/v1/saes", tags=["saes"])


@router.get("", response_model=SAEList, responses=VALIDATION_RESPONSES)
def list_saes(
    session: SessionDep,
    settings: SettingsDep,
    model_id: str | None = Query(None, max_length=200, pattern=NO_NUL,
                                 description="Only the SAEs of this model"),
) -> SAEList:
    found = queries.list_saes(session=session, model_id=model_id)
    saes = [SAEOut.of(s, home=settings.home) for s in found]
    return SAEList(data=saes, count=len(saes))


@router.get("/{sae_id}", response_model=SAEDetail, responses=ERROR_RESPONSES)
def get_sae(session: SessionDep, settings: SettingsDep, sae_id: SaeIdPath) -> SAEDetail:
    detail = SAEDetail.of(queries.get_sae(session=session, sae_id=sae_id), home=settings.home)
    detail.autointerp = AutointerpOut.of(autointerp_summary(session=session, sae_id=sae_id))
    return detail
