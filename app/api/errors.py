"""One error shape for the API, {"error": {"status", "message"}}, error pages for browsers, and
OpenAI's shape on the OpenAI-compatible /v1 routes (app/api/openai_errors.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY
from starlette.routing import Match
from starlette.types import Scope

from app.api.openai_errors import is_openai_path, openai_error_response
from app.api.security_headers import add_security_headers
from app.errors import SaescopeError

log = logging.getLogger(__name__)
# A generation whose client left before its answer: logged with nginx's "client closed request"
# status, never received.
CLIENT_GONE = 499

# (request, status_code, message, headers) -> Response | None; set by the web layer when present.
HtmlRenderer = Callable[[Request, int, str, dict[str, str] | None], Response | None]


def error_response(
    request: Request, status_code: int, message: str, headers: dict[str, str] | None = None,
    *, param: str | None = None, code: str | None = None,
) -> Response:
    """The error in the shape its client reads; ``param`` and ``code`` go into OpenAI's shape
    (the field at fault, a machine-readable reason) and nowhere else."""
    if is_openai_path(request.url.path):
        return openai_error_response(status_code, message, headers=headers, param=param,
                                     code=code)
    renderer: HtmlRenderer | None = getattr(request.app.state, "html_error_renderer", None)
    if renderer is not None:
        page = renderer(request, status_code, message, headers)
        if page is not None:
            return page
    return JSONResponse(
        {"error": {"status": status_code, "message": message}},
        status_code=status_code,
        headers=headers,
    )


def body_limit_message(scope: Scope) -> str:
    """The 413 message: the route's limit (FastAPI's max_body_size, set in app.main)."""
    limit = scope.get(MAX_BODY_SIZE_SCOPE_KEY)
    if limit is None:
        return "request body too large"
    return f"request body too large: this endpoint takes at most {limit:,} bytes"


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":  # loc is ("body", character position)
            position = err.get("loc", ("body", "?"))[-1]
            reason = (err.get("ctx") or {}).get("error", "invalid")
            parts.append(f"body: not valid JSON at character {position} ({reason})")
            continue
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


# Pydantic puts the branch of a union it tried into the error's location ("str", "list[...]",
# "constrained-str", "function-after[...]"); OpenAI's `param` names fields only.
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def _first_field(exc: RequestValidationError) -> str | None:
    """The first invalid field as a dotted path (messages.0.role), for OpenAI's `param`."""
    for err in exc.errors()[:1]:
        if err.get("type") == "json_invalid":
            return None
        parts = [str(p) for p in err.get("loc", ()) if p != "body"]
        parts = [p for p in parts if p not in _TYPE_NAMES and not any(c in p for c in "[]-(")]
        return ".".join(parts) or None
    return None


def _allowed_methods(request: Request) -> str:
    """Every method some route answers on this path: Starlette's 405 names only the first
    matching route's, and one path may have several routes (GET, PUT and DELETE of a label)."""
    allowed = []
    for method in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SaescopeError)
    async def _domain(request: Request, exc: SaescopeError) -> Response:
        headers = None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            headers = {"Retry-After": str(retry_after)}
        if exc.status_code == 401:
            # RFC 9110: a 401 names the scheme that would work.
            headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="saescope"'}
        return error_response(request, exc.status_code, str(exc), headers,
                              param=getattr(exc, "param", None), code=getattr(exc, "code", None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        status_code = exc.status_code
        if status_code == 404 and message == "Not Found":
            message = f"no such page or endpoint: {request.url.path}"
        elif status_code == 413:
            message = body_limit_message(request.scope)
        elif status_code == 400 and isinstance(exc.__cause__, ValueError):
            # FastAPI's answer to a body that is not text (e.g. invalid UTF-8); other bad JSON
            # is already a 422 validation error, so this one is too.
            status_code, message = 422, f"body: not valid JSON ({exc.__cause__})"
        headers = getattr(exc, "headers", None)
        if status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return error_response(request, status_code, message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request, 422, _validation_message(exc), param=_first_field(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        response = error_response(request, 500, "internal server error; the server log has details")
        # This handler runs outside the app's middleware (Starlette's server-error layer).
        add_security_headers(response.headers)
        return response
