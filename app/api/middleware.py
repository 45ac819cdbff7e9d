"""ASGI middleware at the HTTP edge: HEAD answered as GET without a body, the body limit's 413 in
the API's error shape, and the security headers (app/api/security_headers.py) on every response."""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import body_limit_message, error_response
from app.api.security_headers import add_security_headers


class HttpEdge:
    """HEAD runs the GET route and drops the body (FastAPI routes list only the methods they
    declare); a plain-text 413 from the body limit becomes the API's JSON error; missing
    security headers are added."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}
        replaced = False

        async def edge_send(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the body of a response replaced below
            if message["type"] == "http.response.start":
                headers = Headers(raw=message["headers"])
                # The body limit answers plain text when Content-Length is over it, before any
                # route code runs; the API speaks one error shape.
                if message["status"] == 413 and headers.get("content-type", "").startswith(
                        "text/plain"):
                    replaced = True
                    response = error_response(Request(scope), 413, body_limit_message(scope))
                    await response(scope, receive, _EdgeSend(send, head=head))
                    return
                _add_headers(message)
            elif message["type"] == "http.response.body" and head:
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, receive, edge_send)


class _EdgeSend:
    """The send of a replacement response: security headers, and no body for HEAD."""

    def __init__(self, send: Send, *, head: bool) -> None:
        self.send, self.head = send, head

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            _add_headers(message)
        elif message["type"] == "http.response.body" and self.head:
            message = {**message, "body": b""}
        await self.send(message)


def _add_headers(message: Message) -> None:
    headers = MutableHeaders(raw=list(message["headers"]))
    add_security_headers(headers)
    message["headers"] = headers.raw
