"""Labeling pages: sign-in and sign-out, the keyboard-driven queue, label search; and the
dependency that sends a signed-out browser to the sign-in page (auth=token)."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from app.api.auth import (
    LOCAL_ADMIN,
    SESSION_COOKIE,
    Principal,
    cookie_value,
    principal_or_none,
    session_id_from_cookie,
)
from app.api.deps import SessionDep
from app.errors import UnauthorizedError
from app.settings import Settings
from app.store import labels as label_store
from app.store import queries
from app.store.db import read_session
from app.store.users import end_session, start_session, user_by_token
from app.web.pages import _chrome, _sae_for_page
from app.web.templating import sae_url, templates

router = APIRouter(tags=["pages"], include_in_schema=False)
SIGN_IN_ERRORS = {"unknown": "unknown or disabled token; ask an admin for a new one "
                             "(saescope user token NAME)"}


async def page_user(request: Request) -> None:
    """Pages need a signed-in person under auth=token: others go to the sign-in page. The
    person is kept in request.state.principal for the templates (name, role, what to offer)."""
    if request.app.state.settings.auth == "none":
        request.state.principal = LOCAL_ADMIN
        return
    await run_in_threadpool(_require_page_user, request)


def _require_page_user(request: Request) -> Principal:
    try:
        principal = principal_or_none(request)
    except UnauthorizedError:
        principal = None
    if principal is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(303, "sign in first",
                            headers={"Location": f"/sign-in?next={quote(target, safe='')}"})
    request.state.principal = principal
    return principal


def _safe_next(target: str) -> str:
    """Only a path on this site: never an absolute or scheme-relative URL (open redirect)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@router.get("/sign-in", response_class=HTMLResponse)
def sign_in_page(request: Request, session: SessionDep, next: str = "/",  # noqa: A002
                 error: str = "") -> HTMLResponse:
    # Only messages of our own: a link cannot make this site show text of its choosing.
    context = {"next": _safe_next(next), "error": SIGN_IN_ERRORS.get(error, ""),
               "auth": request.app.state.settings.auth,
               **_chrome(session, crumbs=[("sign in", None)])}
    return templates.TemplateResponse(request, "pages/sign_in.html", context)


@router.post("/sign-in")
def sign_in(request: Request, token: Annotated[str, Form(max_length=200)],
            next: Annotated[str, Form(max_length=2000)] = "/") -> Response:  # noqa: A002
    """A token in, a session cookie out (HTTP-only, SameSite=Lax, expiring with the session)."""
    settings: Settings = request.app.state.settings
    engine = request.app.state.db_engine
    with read_session(engine) as session:
        user = user_by_token(session, token.strip())
    if user is None:
        return RedirectResponse(f"/sign-in?error=unknown&next={quote(_safe_next(next))}",
                                status_code=303)
    session_id, _expires = start_session(engine, user_id=user.id, hours=settings.session_hours)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, cookie_value(settings, session_id),
                        max_age=settings.session_hours * 3600, httponly=True, samesite="lax",
                        secure=request.url.scheme == "https", path="/")
    return response


@router.post("/sign-out")
def sign_out(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    session_id = session_id_from_cookie(settings, request.cookies.get(SESSION_COOKIE))
    if session_id:
        end_session(request.app.state.db_engine, session_id)
    response = RedirectResponse("/sign-in", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/labels/search", response_class=HTMLResponse)
def label_search_page(
    request: Request, session: SessionDep,
    q: Annotated[str, Query(max_length=200)] = "",
    tag: Annotated[str, Query(max_length=64)] = "",
    sae: Annotated[str, Query(max_length=200)] = "",
) -> HTMLResponse:
    _require_page_user(request)
    hits = label_store.search_labels(session=session, q=q, tag=tag or None, sae_id=sae or None,
                                     limit=100) if (q or tag) else []
    models = {s.id: s.model_id for s in queries.list_saes(session=session)}
    context = {"q": q, "tag": tag, "sae": sae, "hits": hits, "models": models,
               **_chrome(session, crumbs=[("label search", None)])}
    return templates.TemplateResponse(request, "pages/label_search.html", context)


@router.get("/{model_id}/{sae_id}/queue", response_class=HTMLResponse)
def queue_page(request: Request, session: SessionDep, model_id: str, sae_id: str) -> HTMLResponse:
    """The labeling queue; the page drives POST /api/v1/saes/{sae_id}/queue/next itself."""
    _require_page_user(request)
    sae = _sae_for_page(session, model_id=model_id, sae_id=sae_id)
    context = {"model_id": model_id, "sae_id": sae_id, "d_sae": sae.d_sae,
               **_chrome(session, crumbs=[(model_id, None), (sae_id, sae_url(model_id, sae_id)),
                                          ("label queue", None)],
                         model_id=model_id, sae_id=sae_id)}
    return templates.TemplateResponse(request, "pages/queue.html", context)
