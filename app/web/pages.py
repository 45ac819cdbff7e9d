"""HTML routes of the explorer; each reads through app/store/queries like its /api/v1 twin.

Pages: home, SAE overview (feature table), feature page, text search, random feature, and the
Plotly bundle from the `plotly` package. Their template contexts come from app/web/views.py;
error pages are app/web/error_pages.py.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Template
from sqlalchemy.orm import Session

from app.api.deps import ModelIdPath, SaeIdPath, SessionDep, run_read, text_query
from app.errors import NotFoundError
from app.store import queries
from app.store.labels import autointerp_summary
from app.store.labels import progress as label_progress
from app.store.read_models import SAEInfo
from app.web.csp import PLOT_PAGE_HEADERS
from app.web.templating import PLOTLY_VERSION, feature_url, plotly_bundle_js, sae_url, templates
from app.web.views import (
    COLUMNS,
    FILTERS,
    SORTABLE,
    autointerp_view,
    feature_table_view,
    feature_view,
    home_models,
    sae_view,
)

router = APIRouter(tags=["pages"], include_in_schema=False)

FEATURE_TABLE_PER_PAGE = 50


# --- Plotly, served from the installed package -------------------------------------------------


@lru_cache(maxsize=1)
def _plotly_bundle() -> tuple[bytes, bytes]:
    raw = plotly_bundle_js()
    return raw, gzip.compress(raw, compresslevel=6, mtime=0)


@router.get("/assets/plotly-{version}.min.js")
def plotly_js(version: str, request: Request) -> Response:
    """The Plotly bundle; the version is in the URL, so browsers may keep it for a year."""
    raw, packed = _plotly_bundle()
    headers = {
        "Cache-Control": "public, max-age=31536000, immutable",
        "Vary": "Accept-Encoding",
    }
    if version != PLOTLY_VERSION:
        # An old page asking for a previous version: send the current one, but don't pin it.
        headers["Cache-Control"] = "no-cache"
    if "gzip" in request.headers.get("accept-encoding", ""):
        headers["Content-Encoding"] = "gzip"
        return Response(packed, media_type="text/javascript", headers=headers)
    return Response(raw, media_type="text/javascript", headers=headers)


@router.get("/_ping")
async def ping() -> Response:
    """A route that does nothing: the baseline the serving benchmark compares pages with."""
    return Response("ok", media_type="text/plain")


# --- routes -------------------------------------------------------------------------------------


def _sae_for_page(session: Session, *, model_id: str, sae_id: str) -> SAEInfo:
    """The SAE of a page URL; a URL naming the wrong model for a known SAE is a 404 too."""
    sae = queries.get_sae(session=session, sae_id=sae_id)
    if sae.model_id != model_id:
        raise NotFoundError(
            f"SAE {sae_id!r} belongs to model {sae.model_id!r}, not {model_id!r}; "
            f"see {sae_url(sae.model_id, sae_id)}"
        )
    return sae


def _chrome(
    session: Session, *, crumbs: list[tuple[str, str | None]], model_id: str | None = None,
    sae_id: str | None = None,
) -> dict[str, Any]:
    """Context every page shares: breadcrumbs and the top bar's text-search target."""
    # list_models carries the SAE ids and skips the statistics list_saes would decode.
    choices = [
        {"model_id": m.id, "id": sae_id}
        for m in queries.list_models(session=session) for sae_id in m.sae_ids
    ]
    target = None
    if sae_id is not None and model_id is not None:
        target = {"model_id": model_id, "sae_id": sae_id}
    elif choices:
        target = {"model_id": choices[0]["model_id"], "sae_id": choices[0]["id"]}
    return {"crumbs": crumbs, "search_target": target, "search_choices": choices}


@router.get("/", response_class=HTMLResponse)
def home_page(request: Request, session: SessionDep) -> HTMLResponse:
    models = home_models(queries.list_models(session=session), queries.list_saes(session=session),
                         home=request.app.state.settings.home)
    context = {"models": models, **_chrome(session, crumbs=[])}
    return templates.TemplateResponse(request, "pages/home.html", context)


@router.get("/{model_id}/{sae_id}", response_class=HTMLResponse)
def sae_page(
    request: Request,
    session: SessionDep,
    model_id: ModelIdPath,
    sae_id: SaeIdPath,
    sort: queries.SortKey = "index",
    order: str = "",
    filter: queries.FilterKey = "all",  # noqa: A002 - the query parameter's public name
    q: Annotated[str, text_query(200)] = "",
    token: Annotated[str, text_query(200)] = "",
    tag: Annotated[str, text_query(64)] = "",
    page: int = Query(1, ge=1, le=queries.MAX_PAGE),
    jump: int | None = Query(None, ge=0, le=queries.MAX_ID),
) -> Response:
    """Overview of one SAE with its feature table; ?jump=N goes straight to feature N."""
    sae = _sae_for_page(session, model_id=model_id, sae_id=sae_id)
    if jump is not None:
        return RedirectResponse(feature_url(model_id, sae_id, jump), status_code=303)
    if order not in ("asc", "desc"):
        order = "asc" if sort == "index" else "desc"
    table = queries.list_features(
        session=session, sae_id=sae_id, sort=sort, order=order, filter=filter,
        tag=tag or None, q=q or None, token=token or None, page=page,
        per_page=FEATURE_TABLE_PER_PAGE,
    )
    context = {
        "s": sae_view(sae, home=request.app.state.settings.home),
        "t": feature_table_view(table, per_page=FEATURE_TABLE_PER_PAGE, sort=sort, order=order,
                                filter=filter, q=q, token=token, tag=tag, page=page),
        "progress": label_progress(session=session, sae_id=sae_id),
        "auto": autointerp_view(autointerp_summary(session=session, sae_id=sae_id)),
        "filters": FILTERS,
        "columns": COLUMNS,
        "sortable": SORTABLE,
        **_chrome(session, crumbs=[(model_id, None), (sae_id, None)], model_id=model_id,
                  sae_id=sae_id),
    }
    return templates.TemplateResponse(request, "pages/sae.html", context,
                                      headers=PLOT_PAGE_HEADERS)


@router.get("/{model_id}/{sae_id}/random")
def random_feature_page(session: SessionDep, model_id: ModelIdPath,
                        sae_id: SaeIdPath) -> RedirectResponse:
    _sae_for_page(session, model_id=model_id, sae_id=sae_id)
    index = queries.random_feature(session=session, sae_id=sae_id)
    # 303 + no-store: each press of "r" must land somewhere new, never a cached redirect.
    return RedirectResponse(
        feature_url(model_id, sae_id, index), status_code=303,
        headers={"Cache-Control": "no-store"},
    )


@router.get("/{model_id}/{sae_id}/search", response_class=HTMLResponse)
def search_page(
    request: Request, session: SessionDep, model_id: ModelIdPath, sae_id: SaeIdPath, text: str = ""
) -> HTMLResponse:
    """Text search: the page runs POST /api/v1/saes/{sae_id}/search from the browser."""
    sae = _sae_for_page(session, model_id=model_id, sae_id=sae_id)
    context = {
        "s": sae_view(sae, home=request.app.state.settings.home),
        "text": text,
        **_chrome(session, crumbs=[(model_id, None), (sae_id, sae_url(model_id, sae_id)),
                                   ("text search", None)], model_id=model_id, sae_id=sae_id),
    }
    return templates.TemplateResponse(request, "pages/search.html", context,
                                      headers=PLOT_PAGE_HEADERS)


def feature_template() -> Template:
    return templates.get_template("pages/feature.html")  # compiled once, cached by Jinja


@router.get("/{model_id}/{sae_id}/{index:int}", response_class=HTMLResponse)
async def feature_page(request: Request, model_id: ModelIdPath, sae_id: SaeIdPath,
                       index: int) -> HTMLResponse:
    # Scoring a label asks the server's model: offered when one is (or is being) loaded.
    can_score = request.app.state.engine_state.status in ("ready", "loading")

    def render(session: Session) -> str:
        detail = queries.get_feature(session=session, sae_id=sae_id, index=index)
        if detail.model_id != model_id:
            _sae_for_page(session, model_id=model_id, sae_id=sae_id)  # raises the 404
        context = {
            "f": feature_view(detail),
            "can_score": can_score,
            **_chrome(session, crumbs=[(model_id, None), (sae_id, sae_url(model_id, sae_id)),
                                       (f"#{index}", None)], model_id=model_id, sae_id=sae_id),
        }
        # Rendered on the read thread too: it is most of the page's cost.
        return feature_template().render(request=request, **context)

    return HTMLResponse(await run_read(request, render), headers=PLOT_PAGE_HEADERS)


