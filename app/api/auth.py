"""Who is asking: the auth setting checked at start, the signed session cookie, Bearer tokens,
roles, and the gate every request passes (Host allow-list, cross-site writes refused).

auth=none: everyone is one local admin (only allowed on a loopback bind). auth=token: people
sign in with their token (a session row plus a signed HTTP-only cookie) or send
`Authorization: Bearer <token>`; no or an unknown credential is 401 on the API.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.openai_errors import is_openai_path, openai_error_response
from app.errors import ConfigError, ForbiddenError, UnauthorizedError
from app.settings import Settings
from app.store.db import read_session
from app.store.users import user_by_session, user_by_token

SESSION_COOKIE = "saescope_session"
ROLE_RANK = {"viewer": 0, "annotator": 1, "reviewer": 2, "admin": 3}
PLACEHOLDER_SECRETS = {"", "change-me", "changeme", "secret", "please-change-me"}
MIN_SECRET_LENGTH = 32
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


@dataclass(frozen=True)
class Principal:
    """The person behind a request; `user_id` is None for the local admin of auth=none."""

    name: str
    role: str
    user_id: int | None = None

    def can(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


LOCAL_ADMIN = Principal(name="local", role="admin")


def check_auth_settings(settings: Settings) -> None:
    """Refuse to start an open server on a non-loopback address, or a token server without a
    real secret key (ConfigError: the CLI prints it as one line and exits 2)."""
    if settings.auth == "none" and not _is_loopback(settings.host):
        raise ConfigError(
            f"SAESCOPE_AUTH=none serves everyone as admin, so it binds only to loopback, not "
            f"{settings.host}; set SAESCOPE_AUTH=token (and SAESCOPE_SECRET_KEY) or --host "
            "127.0.0.1")
    if settings.auth == "token" and (settings.secret_key.strip().lower() in PLACEHOLDER_SECRETS
                                     or len(settings.secret_key) < MIN_SECRET_LENGTH):
        raise ConfigError(
            f"SAESCOPE_AUTH=token needs SAESCOPE_SECRET_KEY: {MIN_SECRET_LENGTH}+ random "
            "characters, e.g. from `python -c 'import secrets; print(secrets.token_urlsafe(48))'`")


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- the session cookie -------------------------------------------------------------------------


def _signature(settings: Settings, session_id: str) -> str:
    key = settings.secret_key.encode("utf-8")
    return hmac.new(key, session_id.encode("ascii"), hashlib.sha256).hexdigest()


def cookie_value(settings: Settings, session_id: str) -> str:
    return f"{session_id}.{_signature(settings, session_id)}"


def session_id_from_cookie(settings: Settings, value: str | None) -> str | None:
    if not value or "." not in value:
        return None
    session_id, _, signature = value.rpartition(".")
    if not hmac.compare_digest(signature, _signature(settings, session_id)):
        return None
    return session_id


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def principal_or_none(request: Request) -> Principal | None:
    """The person behind the request, or None when auth=token and nobody is signed in. An
    Authorization header that does not name an enabled user is a 401, not an anonymous request."""
    settings: Settings = request.app.state.settings
    if settings.auth == "none":
        return LOCAL_ADMIN
    token = _bearer(request)
    session_id = None if token else session_id_from_cookie(
        settings, request.cookies.get(SESSION_COOKIE))
    if token is None and session_id is None:
        if request.headers.get("authorization"):
            raise UnauthorizedError("Authorization: use 'Bearer <token>'")
        return None
    with read_session(request.app.state.db_engine) as session:
        user = user_by_token(session, token) if token else user_by_session(session, session_id)
    if user is None:
        if token:
            raise UnauthorizedError("unknown or disabled token")
        return None
    return Principal(name=user.name, role=user.role, user_id=user.id)


def require(principal: Principal | None, role: str) -> Principal:
    if principal is None:
        raise UnauthorizedError("sign in first: /sign-in, or send Authorization: Bearer <token>")
    if not principal.can(role):
        raise ForbiddenError(f"{principal.name} is a {principal.role}; this needs {role} or above")
    return principal


# --- the gate ------------------------------------------------------------------------------------


def host_allowed(host_header: str, allowed: set[str]) -> bool:
    """A Host a DNS-rebinding page cannot have: a listed name, an IP literal, or a name without
    a dot (a rebinding page is served under a registered domain, which always has one)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[: host.find("]") + 1]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.rstrip(".")
    if host in allowed:
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return "." not in host


def cross_site(headers: dict[str, str], host: str) -> bool:
    """A browser request sent by another site: Sec-Fetch-Site says so, or (older browsers) the
    Origin's host is not the Host the request came to."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is None:
        return False  # not a browser's cross-site request (curl, scripts, same-origin forms)
    if origin == "null":
        return True
    return origin.split("://", 1)[-1].rstrip("/").lower() != host.lower()


class RequestGate:
    """ASGI middleware: Host allow-list for auth=none, and unsafe cross-site requests refused."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.auth_none = settings.auth == "none"
        self.allowed = {h.strip().lower() for h in settings.allowed_hosts.split(",") if h.strip()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        problem: tuple[int, str] | None = None
        if self.auth_none and not host_allowed(host, self.allowed):
            problem = (400, f"Host {host[:100]!r} is not allowed; add it to "
                            "SAESCOPE_ALLOWED_HOSTS, or use SAESCOPE_AUTH=token")
        elif scope["method"] in UNSAFE_METHODS and cross_site(headers, host):
            problem = (403, "cross-site request refused: send it from this site's own pages")
        if problem is None:
            await self.app(scope, receive, send)
            return
        status, message = problem
        if is_openai_path(scope["path"]):
            response = openai_error_response(status, message)
        else:
            response = JSONResponse({"error": {"status": status, "message": message}},
                                    status_code=status)
        await response(scope, receive, send)


def install_gate(app: Any, settings: Settings) -> None:
    app.add_middleware(RequestGate, settings=settings)
