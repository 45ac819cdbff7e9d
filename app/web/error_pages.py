"""Error pages by status for browsers: what went wrong, and links to pages that exist."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from app.store import queries
from app.store.db import read_session
from app.store.read_models import SAEInfo
from app.web.templating import sae_url, search_url, templates

ERROR_TITLES = {
    400: "Bad request",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    422: "That input cannot be used",
    429: "Too many requests",
    500: "Something went wrong",
    503: "Busy, try again shortly",
}


def wants_html(request: Request) -> bool:
    """True for page paths (not /api, /static, /assets, /openapi.json), unless the client asks
    for JSON and not HTML: a mistyped page URL gets a page with links, whoever asks."""
    path = request.url.path
    if path.startswith(("/api/", "/static/", "/assets/")) or path in ("/api", "/openapi.json"):
        return False
    accept = request.headers.get("accept", "")
    return "text/html" in accept or "application/json" not in accept


def _known_saes(request: Request) -> list[SAEInfo]:
    """SAEs to offer as a way back; an error page must render even when the database cannot."""
    engine = getattr(request.app.state, "db_engine", None)
    if engine is None:
        return []
    try:
        with read_session(engine) as session:
            return queries.list_saes(session=session)
    except Exception:  # noqa: BLE001 - the page reports the original error, not this one
        return []


def error_page(
    request: Request, *, status_code: int, message: str, headers: dict[str, str] | None = None
) -> HTMLResponse:
    """The error page for a status: what went wrong, and links to pages that exist."""
    saes = _known_saes(request)
    parts = [p for p in request.url.path.split("/") if p]
    back: list[tuple[str, str]] = []
    here = next((s for s in saes if len(parts) >= 2 and (s.model_id, s.id) == tuple(parts[:2])),
                None)
    if here is not None:
        back.append((f"{here.id} overview", sae_url(here.model_id, here.id)))
        back.append(("text search", search_url(here.model_id, here.id)))
    else:
        back += [(f"{s.model_id} · {s.id}", sae_url(s.model_id, s.id)) for s in saes[:4]]
    back.append(("home", "/"))
    choices = [{"model_id": s.model_id, "id": s.id} for s in saes]
    target = here or (saes[0] if saes else None)
    context = {
        "status_code": status_code,
        "title": ERROR_TITLES.get(status_code, "Error"),
        "message": message,
        "back_links": back,
        "crumbs": [],
        "search_target": {"model_id": target.model_id, "sae_id": target.id} if target else None,
        "search_choices": choices,
    }
    return templates.TemplateResponse(
        request, "errors/error.html", context, status_code=status_code, headers=headers
    )


def render_html_error(
    request: Request, status_code: int, message: str, headers: dict[str, str] | None = None
) -> Response | None:
    """app.state.html_error_renderer: an error page for browsers, None (JSON) for the rest."""
    if not wants_html(request):
        return None
    return error_page(request, status_code=status_code, message=message, headers=headers)
