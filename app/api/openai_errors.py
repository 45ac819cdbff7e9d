"""OpenAI's error shape for the OpenAI-compatible routes under /v1: {"error": {"message", "type",
"param", "code"}}, which OpenAI clients (the openai package, llama.cpp and vLLM clients) read.

Every error answered on a /v1 path takes this shape, whichever layer raised it (validation, the
auth gate, the body limit, the model queue); a 422 becomes OpenAI's 400 for a bad request.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

OPENAI_PREFIX = "/v1/"

# status -> (type, code) as OpenAI and the servers copying it name them
_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "service_unavailable"),
}


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, "
                                  "permission_error, rate_limit_error or server_error")
    param: str | None = Field(description="The request field at fault, when one is")
    code: str | None = Field(description="e.g. model_not_found, invalid_api_key, "
                                         "request_too_large, service_unavailable")


class OpenAIErrorOut(BaseModel):
    """The error shape of every /v1 response."""

    error: OpenAIErrorBody


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


def openai_error_response(status_code: int, message: str, *,
                          headers: dict[str, str] | None = None, param: str | None = None,
                          code: str | None = None) -> JSONResponse:
    if status_code == 422:
        status_code = 400
    kind, default_code = _KINDS.get(
        status_code, ("server_error" if status_code >= 500 else "invalid_request_error", None))
    body: dict[str, Any] = {"message": message, "type": kind, "param": param,
                            "code": code or default_code}
    return JSONResponse({"error": body}, status_code=status_code, headers=headers)
