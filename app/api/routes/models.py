"""/api/v1/models: the language models in the database and their SAEs."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import SessionDep, SettingsDep
from app.api.schemas import ModelList, ModelOut
from app.store import queries

router = APIRouter(prefix="/api/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, settings: SettingsDep) -> ModelList:
    models = [ModelOut.of(m, home=settings.home) for m in queries.list_models(session=session)]
    return ModelList(data=models, count=len(models))
