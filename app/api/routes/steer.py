"""/api/v1/steer: steered generation beside the default one (JSON or server-sent events), and
strength sweeps.

Every request is checked against the store first (known SAEs and feature indices, saved
vectors, the deployment's bounds: 422 with what to change), then runs on the model worker as a
stream, one forward per turn, so searches and other generations interleave with it. A full
queue is a 503 with Retry-After before anything runs, and so is a person's generation past their
limit under auth=token, as a 429 (api/generation_limit.py); a client that leaves (or a stream
closed early) cancels its job after the step in progress and frees its slot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from app.api.auth import Principal
from app.api.deps import CurrentUser, EngineStateDep, ModelWorkerDep, SettingsDep, run_read
from app.api.errors import CLIENT_GONE
from app.api.generation_limit import HeldSlot, take_generation_slot
from app.api.model_service import EngineState, ModelService
from app.api.model_worker import ModelStream, ModelWorker
from app.api.steer_schemas import (
    GENERATION_MAX_BODY_BYTES,
    STEER_RESPONSES,
    GenerationSettings,
    SteerIn,
    SteerOut,
    SweepIn,
    SweepOut,
)
from app.errors import ConfigError, NotFoundError, SaescopeError
from app.settings import Settings
from app.store import queries
from app.store import steering as saved
from app.store.read_models import SAEBrief

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/steer", tags=["steer"])
MAX_BODY_BYTES = GENERATION_MAX_BODY_BYTES

STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    **STEER_RESPONSES,
    200: {"description": "Server-sent events: `token` {which, index, text} as text completes, "
                         "`error` {message} for a failure after the stream began, then `done` "
                         "{default, steered: {tokens, stop_reason}}; each event's data is JSON",
          "content": {"text/event-stream": {"schema": {
              "type": "object", "required": ["event", "data"],
              "properties": {"event": {"type": "string", "enum": ["token", "error", "done"]},
                             "data": {"type": "string"}}}}}},
}


def _sae(session: Session, sae_id: str, cache: dict[str, SAEBrief]) -> SAEBrief:
    """The SAE's brief row (NotFoundError when unknown: a well-formed request for something
    this database does not hold is a 404, as in the read routes)."""
    if sae_id not in cache:
        cache[sae_id] = queries.get_sae_brief(session=session, sae_id=sae_id)
    return cache[sae_id]


def _check_feature(session: Session, *, sae_id: str, index: int, model_id: str,
                   cache: dict[str, SAEBrief]) -> None:
    sae = _sae(session, sae_id, cache)
    if sae.model_id != model_id:
        raise ConfigError(f"SAE {sae_id!r} reads model {sae.model_id!r}, not {model_id!r}: "
                          "steer with SAEs of one model")
    if index >= sae.d_sae:
        raise NotFoundError(f"SAE {sae_id!r} has features 0..{sae.d_sae - 1}; no feature {index}")


def _check_settings(body: GenerationSettings, settings: Settings) -> None:
    if body.max_new_tokens > settings.steer_max_new_tokens:
        raise ConfigError(f"max_new_tokens is {body.max_new_tokens}; the limit is "
                          f"{settings.steer_max_new_tokens} (SAESCOPE_STEER_MAX_NEW_TOKENS)")


def _generation_kwargs(body: GenerationSettings, settings: Settings) -> dict[str, Any]:
    return {"sae_id": body.sae_id, "prompt": body.prompt, "scope": body.scope,
            "max_new_tokens": body.max_new_tokens, "temperature": body.temperature,
            "top_p": body.top_p, "seed": body.seed, "chat_template": body.chat_template,
            "max_prompt_tokens": settings.max_text_tokens,
            "deadline": time.monotonic() + settings.steer_time_limit_s}


def steer_plan(session: Session, body: SteerIn, settings: Settings) -> dict[str, Any]:
    """The service's steer_stream arguments for a checked request (ConfigError / NotFoundError
    saying what is wrong)."""
    _check_settings(body, settings)
    cache: dict[str, SAEBrief] = {}
    model_id = _sae(session, body.sae_id, cache).model_id
    features = []
    for f in body.features:
        sae_id = f.sae_id or body.sae_id
        _check_feature(session, sae_id=sae_id, index=f.index, model_id=model_id, cache=cache)
        features.append({"index": f.index, "mode": f.mode, "value": f.value, "sae_id": sae_id})
    found = saved.get_vectors(session=session, names=[v.name for v in body.vectors])
    vectors = []
    for v in body.vectors:
        vector = found[v.name]
        if _sae(session, vector.sae_id, cache).model_id != model_id:
            raise ConfigError(f"vector {v.name!r} was made on another model's activations")
        vectors.append({"name": v.name, "hook_name": vector.hook_name, "vector": vector.vector,
                        "value": v.value})
    return {**_generation_kwargs(body, settings), "features": features, "vectors": vectors}


def sweep_plan(session: Session, body: SweepIn, settings: Settings) -> dict[str, Any]:
    _check_settings(body, settings)
    cache: dict[str, SAEBrief] = {}
    model_id = _sae(session, body.sae_id, cache).model_id
    _check_feature(session, sae_id=body.sae_id, index=body.index, model_id=model_id, cache=cache)
    return {**_generation_kwargs(body, settings), "index": body.index, "mode": body.mode,
            "values": list(body.values)}


async def _open_stream(request: Request, *, user: Principal, engine_state: EngineState,
                       worker: ModelWorker, plan: Callable[[Session], dict[str, Any]],
                       steps: Callable[[ModelService, dict[str, Any]], Iterator[Any]],
                       ) -> tuple[ModelStream[Any], HeldSlot]:
    """Check the request, take one of the person's generation slots (TooManyRequestsError: 429),
    then admit its job (BusyError: 503 at once). The caller releases the slot when the stream
    ends, however it ends."""
    kwargs = await run_read(request, plan)
    service = engine_state.require()
    slot = await take_generation_slot(request, user)
    try:
        return worker.stream(lambda: steps(service, kwargs)), slot
    except BaseException:
        await slot.release()
        raise


@router.post("", response_model=SteerOut, responses=STEER_RESPONSES)
async def steer(body: SteerIn, request: Request, user: CurrentUser, settings: SettingsDep,
                worker: ModelWorkerDep, engine_state: EngineStateDep) -> SteerOut | Response:
    """Default and steered continuations of the prompt, side by side, as JSON once both end."""
    stream, slot = await _open_stream(
        request, user=user, engine_state=engine_state, worker=worker,
        plan=lambda session: steer_plan(session, body, settings),
        steps=lambda service, kwargs: service.steer_stream(**kwargs))
    done: dict[str, Any] = {}
    try:
        async with stream:
            async for events in stream:
                done.update(next((e["data"] for e in events if e["event"] == "done"), {}))
                if not done and await request.is_disconnected():
                    # Leaving the block cancels the job after this step; nobody reads the answer.
                    return Response(status_code=CLIENT_GONE)
    finally:
        await slot.release()
    return SteerOut.model_validate(done)


@router.post("/stream", responses=STREAM_RESPONSES, response_class=EventSourceResponse)
async def steer_stream(body: SteerIn, request: Request, user: CurrentUser, settings: SettingsDep,
                       worker: ModelWorkerDep, engine_state: EngineStateDep) -> EventSourceResponse:
    """The same generation as server-sent events, token by token (POST: read it with fetch)."""
    stream, slot = await _open_stream(
        request, user=user, engine_state=engine_state, worker=worker,
        plan=lambda session: steer_plan(session, body, settings),
        steps=lambda service, kwargs: service.steer_stream(**kwargs))
    try:
        # The first step checks the request on the model side (the SAE loaded, the prompt's
        # tokens) and runs the prefill: its errors are still plain error responses.
        first = await stream.__anext__()
    except BaseException:
        await stream.aclose()
        await slot.release()
        raise
    # The background task runs once the response ends, a client that left included: it closes
    # the job and frees the slot even when the body never started (both are idempotent).
    return EventSourceResponse(_sse(stream, first, slot), ping=15,
                               background=BackgroundTask(_close, stream, slot))


async def _close(stream: ModelStream[Any], slot: HeldSlot) -> None:
    await stream.aclose()
    await slot.release()


def _sse_event(event: dict[str, Any]) -> dict[str, str]:
    data = event["data"]
    if event["event"] == "done":
        data = {which: {"tokens": out["n_tokens"], "stop_reason": out["stop_reason"]}
                for which, out in data.items()}
    return {"event": event["event"], "data": orjson.dumps(data).decode()}


async def _sse(stream: ModelStream[Any], first: list[dict[str, Any]], slot: HeldSlot
               ) -> AsyncIterator[dict[str, str]]:
    try:
        for event in first:
            yield _sse_event(event)
        async for events in stream:
            for event in events:
                yield _sse_event(event)
    except SaescopeError as exc:
        yield {"event": "error", "data": orjson.dumps({"message": str(exc)}).decode()}
    except Exception:  # noqa: BLE001 - the response has begun: the error goes in the stream
        log.exception("a steering stream failed")
        yield {"event": "error", "data": orjson.dumps(
            {"message": "the generation failed; the server log has details"}).decode()}
    finally:
        await _close(stream, slot)


@router.post("/sweep", response_model=SweepOut, responses=STEER_RESPONSES)
async def sweep(body: SweepIn, request: Request, user: CurrentUser, settings: SettingsDep,
                worker: ModelWorkerDep, engine_state: EngineStateDep) -> SweepOut | Response:
    """One feature at several strengths in one batch: each strength's text, the feature's
    realised activation on the generated tokens, and the text's mean log-probability under the
    unsteered model (where it drops, the text stops being coherent)."""
    stream, slot = await _open_stream(
        request, user=user, engine_state=engine_state, worker=worker,
        plan=lambda session: sweep_plan(session, body, settings),
        steps=lambda service, kwargs: service.steer_sweep(**kwargs))
    result: dict[str, Any] = {}
    try:
        async with stream:
            async for item in stream:
                if item is not None:
                    result = item
                elif await request.is_disconnected():
                    return Response(status_code=CLIENT_GONE)
    finally:
        await slot.release()
    return SweepOut.model_validate({"sae_id": body.sae_id, "index": body.index,
                                    "mode": body.mode, **result})
