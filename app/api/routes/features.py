"""/api/v1/saes/{sae_id}/features: the feature table, one feature, a random feature."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from sqlalchemy.orm import Session

from app.api.deps import SaeIdPath, SessionDep, run_read, text_query
from app.api.feature_json import feature_etag, feature_json
from app.api.schemas import ERROR_RESPONSES, FeatureList, FeatureOut, RandomFeatureOut
from app.store import queries

router = APIRouter(prefix="/api/v1/saes/{sae_id}/features", tags=["features"])

IndexPath = Annotated[int, Path(ge=0, le=queries.MAX_ID, description="Feature index, 0..d_sae-1")]


@router.get("", response_model=FeatureList, responses=ERROR_RESPONSES)
def list_features(
    session: SessionDep,
    sae_id: SaeIdPath,
    sort: queries.SortKey = "index",
    order: Literal["asc", "desc"] = "asc",
    filter: queries.FilterKey = "all",  # noqa: A002 - the public parameter name
    tag: Annotated[str | None, text_query(64, "Labels with this tag")] = None,
    q: Annotated[str | None, text_query(200, "Label text contains")] = None,
    token: Annotated[
        str | None, text_query(200, "Token string or id under a top window's max"),
    ] = None,
    page: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = 1,
    per_page: Annotated[int, Query(ge=1, le=queries.MAX_PER_PAGE)] = 50,
) -> FeatureList:
    return FeatureList.of(queries.list_features(
        session=session, sae_id=sae_id, sort=sort, order=order, filter=filter, tag=tag, q=q,
        token=token, page=page, per_page=per_page,
    ))


@router.get("/random", response_model=RandomFeatureOut, responses=ERROR_RESPONSES)
def random_feature(session: SessionDep, sae_id: SaeIdPath) -> RandomFeatureOut:
    return RandomFeatureOut(sae_id=sae_id,
                            index=queries.random_feature(session=session, sae_id=sae_id))


@router.get("/{index}", response_model=FeatureOut, responses={
    **ERROR_RESPONSES, 304: {"description": "Not modified (If-None-Match had the ETag)"}})
async def get_feature(request: Request, sae_id: SaeIdPath, index: IndexPath) -> Response:
    def read(session: Session) -> tuple[bytes, str]:
        # Serialized directly (app/api/feature_json.py); FeatureOut documents the shape.
        detail = queries.get_feature(session=session, sae_id=sae_id, index=index)
        return feature_json(detail, home=request.app.state.settings.home), feature_etag(detail)

    body, tag = await run_read(request, read)
    headers = {"ETag": tag}
    if tag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(content=body, media_type="application/json", headers=headers)
