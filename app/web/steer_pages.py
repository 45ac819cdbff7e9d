"""The steering lab's pages: /steer (the lab, prefilled from the query string or a saved run)
and /steer/runs/{id} (a saved run, shown as it was saved: nothing re-runs).

Mounted before the explorer's routes: /steer/runs/{id} has the shape of a feature URL.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from app.api.deps import run_read
from app.api.steer_schemas import MAX_FEATURES, MAX_SWEEP_VALUES, MAX_VECTORS
from app.settings import Settings
from app.store import queries
from app.store import steering as saved
from app.web.csp import PLOT_PAGE_HEADERS
from app.web.templating import feature_url, templates

router = APIRouter(tags=["pages"], include_in_schema=False)


def _sae_choices(session: Session) -> list[dict[str, Any]]:
    models = {m.id: m for m in queries.list_models(session=session)}
    return [{"id": s.id, "model_id": s.model_id, "hook_name": s.hook_name, "d_sae": s.d_sae,
             "chat": bool(models[s.model_id].has_chat_template) if s.model_id in models else False}
            for s in queries.list_saes(session=session)]


def _chrome(choices: list[dict[str, Any]], crumbs: list[tuple[str, str | None]]) -> dict:
    target = {"model_id": choices[0]["model_id"], "sae_id": choices[0]["id"]} if choices else None
    return {"crumbs": crumbs, "search_target": target,
            "search_choices": [{"model_id": c["model_id"], "id": c["id"]} for c in choices]}


@router.get("/steer", response_class=HTMLResponse)
async def steer_page(
    request: Request,
    sae: Annotated[str, Query(max_length=200)] = "",
    feature: Annotated[int | None, Query(ge=0)] = None,
    mode: Annotated[str, Query(max_length=16)] = "add",
    value: float | None = None,
    run: Annotated[int | None, Query(ge=1)] = None,
) -> HTMLResponse:
    """The lab: ?sae=ID&feature=N[&mode=&value=] starts with that feature; ?run=ID with a saved
    run's request."""
    settings: Settings = request.app.state.settings

    def render(session: Session) -> str:
        choices = _sae_choices(session)
        prefill: dict[str, Any] = {"sae_id": sae or (choices[0]["id"] if choices else "")}
        if feature is not None:
            prefill["features"] = [{"index": feature, "mode": mode,
                                    **({"value": value} if value is not None else {})}]
        if run is not None:
            prefill = saved.get_run(session=session, run_id=run).request
        context = {
            "saes": choices, "prefill": prefill,
            "limits": {"max_new_tokens": settings.steer_max_new_tokens,
                       "max_features": MAX_FEATURES, "max_vectors": MAX_VECTORS,
                       "max_sweep_values": MAX_SWEEP_VALUES},
            **_chrome(choices, [("steering lab", None)]),
        }
        return templates.get_template("pages/steer.html").render(request=request, **context)

    return HTMLResponse(await run_read(request, render), headers=PLOT_PAGE_HEADERS)


@router.get("/steer/runs/{run_id}", response_class=HTMLResponse)
async def steer_run_page(request: Request,
                         run_id: Annotated[int, Path(ge=1, le=2**62)]) -> HTMLResponse:
    def render(session: Session) -> str:
        found = saved.get_run(session=session, run_id=run_id)
        choices = _sae_choices(session)
        models = {c["id"]: c["model_id"] for c in choices}
        features = []
        for f in found.request.get("features", []):
            sae_id = f.get("sae_id") or found.sae_id
            url = feature_url(models[sae_id], sae_id, f["index"]) if sae_id in models else None
            features.append({**f, "sae_id": sae_id, "url": url})
        context = {"run": found, "req": found.request, "features": features,
                   **_chrome(choices, [("steering lab", "/steer"), (found.name, None)])}
        return templates.get_template("pages/steer_run.html").render(request=request, **context)

    return HTMLResponse(await run_read(request, render))
