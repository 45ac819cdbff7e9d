"""The security headers every response carries, and the default Content-Security-Policies; a
page that needs more sets its own policy (app/web/csp.py) and keeps it."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders

# Every response: no MIME sniffing, never inside a frame, no full URL to other sites.
BASE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "strict-origin-when-cross-origin",
}
# Pages: only this origin's scripts, styles, images and connections; no plugins, no <base>, no
# framing, forms post only here.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
# Anything that is not a page (JSON, scripts, images): nothing to run if opened as a document.
NON_PAGE_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"


def add_security_headers(headers: MutableHeaders) -> None:
    """Add the headers a response does not set itself."""
    for name, value in BASE_HEADERS.items():
        if name not in headers:
            headers[name] = value
    if "content-security-policy" not in headers:
        is_page = headers.get("content-type", "").startswith("text/html")
        headers["Content-Security-Policy"] = PAGE_CSP if is_page else NON_PAGE_CSP
