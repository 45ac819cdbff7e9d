"""/v1: an OpenAI-compatible chat endpoint for the loaded model (`POST /v1/chat/completions`,
`GET /v1/models`), so OpenAI clients, and another saescope's autointerp, can use it.

The prompt is the model's chat template, or a plain role-prefixed transcript for models
without one (app/engine/chat.py). Generation runs on the model worker as a stream, one forward
per turn, interleaved with searches and steering; a full queue is a 503 with Retry-After before
anything runs, and a client that leaves cancels its job. Errors take OpenAI's shape
(app/api/openai_errors.py).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from sse_starlette import EventSourceResponse

from app.api.deps import EngineStateDep, ModelWorkerDep, SettingsDep
from app.api.errors import CLIENT_GONE
from app.api.model_worker import ModelStream
from app.api.openai_errors import OpenAIErrorBody
from app.api.openai_schemas import (
    AUTH_RESPONSES,
    CHAT_RESPONSES,
    MAX_BODY_BYTES,
    ChatCompletion,
    ChatCompletionRequest,
    ModelCard,
    ModelCardList,
    Usage,
)
from app.errors import ConfigError, NotFoundError, SaescopeError
from app.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])
__all__ = ["MAX_BODY_BYTES", "router"]
STARTED = int(time.time())  # a model card's `created`: when this server started


class ModelNotFoundError(NotFoundError):
    param = "model"  # OpenAI's error fields (app/api/errors.py reads them)
    code = "model_not_found"


class FieldError(ConfigError):
    """A request field over a bound the deployment sets (OpenAI's `param` names it)."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


@router.get("/models", response_model=ModelCardList, responses=AUTH_RESPONSES)
async def list_models(engine_state: EngineStateDep) -> ModelCardList:
    """The model chat completions answer with: the one this server loaded (none while it
    loads, or when the server runs without a model)."""
    service = engine_state.service if engine_state.status == "ready" else None
    cards = [] if service is None else [
        ModelCard(id=service.model_id, created=STARTED, owned_by="saescope")]
    return ModelCardList(data=cards)


def _plan(body: ChatCompletionRequest, settings: Settings) -> dict[str, Any]:
    """The service's chat_stream arguments (ConfigError: a 400 saying what to change)."""
    limit = settings.steer_max_new_tokens
    new_tokens = body.new_tokens()
    if new_tokens is not None and new_tokens > limit:
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise FieldError(f"{field} is {new_tokens}; the limit is {limit} "
                         "(SAESCOPE_STEER_MAX_NEW_TOKENS)", param=field)
    return {"messages": [{"role": m.role, "content": m.text()} for m in body.messages],
            "max_tokens": new_tokens or limit, "temperature": body.temperature,
            "top_p": body.top_p,
            "seed": secrets.randbits(32) if body.seed is None else body.seed,
            "stop": body.stops(), "max_prompt_tokens": settings.chat_max_prompt_tokens,
            "deadline": time.monotonic() + settings.steer_time_limit_s}


@router.post("/chat/completions", response_model=ChatCompletion, responses=CHAT_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request, settings: SettingsDep,
                           worker: ModelWorkerDep, engine_state: EngineStateDep,
                           ) -> ChatCompletion | Response:
    """The loaded model's reply to the messages, as a chat.completion object, or streamed as
    chat.completion.chunk events (stream=true)."""
    kwargs = _plan(body, settings)
    service = engine_state.require()
    if body.model != service.model_id:
        raise ModelNotFoundError(f"model {body.model!r} is not served here; this server "
                                 f"loaded {service.model_id!r} (GET /v1/models)")
    stream = worker.stream(lambda: service.chat_stream(**kwargs))
    ident = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    try:
        # The first step builds and checks the prompt and runs the prefill: its errors (a
        # prompt over the limit, a template that refuses the messages) are plain error answers.
        first = await stream.__anext__()
    except BaseException:
        await stream.aclose()
        raise
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(
            _chunks(stream, first, ident=ident, created=created, model=service.model_id,
                    include_usage=include_usage),
            ping=15, sep="\n")
    parts, last = [first["text"]], first
    async with stream:
        async for item in stream:
            parts.append(item["text"])
            last = item
            if await request.is_disconnected():
                # Leaving the block cancels the job after this step; nobody reads the answer.
                return Response(status_code=CLIENT_GONE)
    return ChatCompletion.model_validate({
        "id": ident, "created": created, "model": service.model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                     "finish_reason": last["finish_reason"]}],
        "usage": _usage(last)})


def _usage(item: dict[str, Any]) -> Usage:
    return Usage(prompt_tokens=item["prompt_tokens"],
                 completion_tokens=item["completion_tokens"],
                 total_tokens=item["prompt_tokens"] + item["completion_tokens"])


async def _chunks(stream: ModelStream[dict[str, Any]], first: dict[str, Any], *, ident: str,
                  created: int, model: str, include_usage: bool) -> AsyncIterator[dict[str, str]]:
    """OpenAI's stream: a chunk with the role, one per piece of text, one with the finish
    reason, the usage when asked for, then [DONE]; a failure midway sends an error object
    and ends the stream without [DONE]."""

    def chunk(delta: dict[str, Any], finish: str | None = None,
              usage: Usage | None = None) -> dict[str, str]:
        """A chat.completion.chunk (ChatCompletionChunk's shape) as one event's data."""
        data: dict[str, Any] = {
            "id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}]}
        if usage is not None:
            data["usage"] = usage.model_dump()
        return {"data": orjson.dumps(data).decode()}

    try:
        yield chunk({"role": "assistant", "content": ""})
        item = first
        async with stream:
            while True:
                if item["text"]:
                    yield chunk({"content": item["text"]})
                if item["finish_reason"] is not None:
                    yield chunk({}, item["finish_reason"])
                    if include_usage:
                        yield chunk({}, usage=_usage(item))
                    break
                item = await stream.__anext__()
        yield {"data": "[DONE]"}
    except SaescopeError as exc:
        yield _error_event(str(exc), code=None)
    except Exception:  # noqa: BLE001 - the response has begun: the error goes in the stream
        log.exception("a chat completion stream failed")
        yield _error_event("the generation failed; the server log has details", code=None)
    finally:
        await stream.aclose()


def _error_event(message: str, *, code: str | None) -> dict[str, str]:
    error = OpenAIErrorBody(message=message, type="server_error", param=None, code=code)
    return {"data": orjson.dumps({"error": error.model_dump()}).decode()}
