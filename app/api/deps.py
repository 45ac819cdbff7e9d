"""FastAPI dependencies, declared once as Annotated aliases (SessionDep, SettingsDep, ...)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Query, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.auth import LOCAL_ADMIN, Principal, principal_or_none, require
from app.api.model_service import EngineState
from app.api.model_worker import ModelWorker
from app.settings import Settings
from app.store.db import read_session

T = TypeVar("T")


# The plain accessors are async so FastAPI calls them inline: a sync dependency runs on the
# threadpool, one thread hop per dependency per request.
async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """A read session on one snapshot for the whole request (see store.db.read_session)."""
    with read_session(request.app.state.db_engine) as session:
        yield session


async def get_model_worker(request: Request) -> ModelWorker:
    return request.app.state.model_worker


async def get_engine_state(request: Request) -> EngineState:
    """Where the model stands. Routes call `.require()` for the service (503 saying why not)
    after validating their input, so a bad request is a 422/404 whatever the model's state."""
    return request.app.state.engine_state


# Strings that reach SQL: PostgreSQL refuses a NUL character in text, so it is a 422 here rather
# than a database error there.
NO_NUL = r"^[^\x00]*$"
SaeIdPath = Annotated[str, Path(max_length=200, pattern=NO_NUL, description="SAE id")]
ModelIdPath = Annotated[str, Path(max_length=200, pattern=NO_NUL, description="Model id")]


def text_query(max_length: int, description: str = "") -> Any:
    """A text query parameter that reaches SQL (see NO_NUL)."""
    return Query(max_length=max_length, pattern=NO_NUL, description=description)


async def _principal(request: Request, role: str) -> Principal:
    # auth=none answers without a thread hop; a token or session is a database read, off the loop.
    if request.app.state.settings.auth == "none":
        return require(LOCAL_ADMIN, role)
    return require(await run_in_threadpool(principal_or_none, request), role)


async def current_user(request: Request) -> Principal:
    """The signed-in person (auth=token) or the local admin (auth=none); 401 when nobody."""
    return await _principal(request, "viewer")


def _role(role: str) -> Callable[[Request], Awaitable[Principal]]:
    async def dependency(request: Request) -> Principal:
        return await _principal(request, role)

    dependency.__name__ = f"require_{role}"
    return dependency


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
CurrentUser = Annotated[Principal, Depends(current_user)]
# Writes check the role here, once: a viewer gets 403 on every write route.
AnnotatorUser = Annotated[Principal, Depends(_role("annotator"))]
ReviewerUser = Annotated[Principal, Depends(_role("reviewer"))]
AdminUser = Annotated[Principal, Depends(_role("admin"))]
SessionDep = Annotated[Session, Depends(get_session)]
ModelWorkerDep = Annotated[ModelWorker, Depends(get_model_worker)]
EngineStateDep = Annotated[EngineState, Depends(get_engine_state)]


async def run_read(request: Request, fn: Callable[[Session], T]) -> T:
    """`fn(session)` on one read snapshot, on the app's small read pool (see create_app).

    The feature JSON and feature page use this instead of SessionDep: one thread hop per request
    instead of three (a sync dependency enters and exits on the threadpool too), and a pool of
    a few threads, not the threadpool's forty, keeps concurrent readers from time-slicing the
    GIL, which stretches every one of them (measured in bench/serve.py).
    """
    engine = request.app.state.db_engine

    def job() -> T:
        with read_session(engine) as session:
            return fn(session)

    pool = request.app.state.read_pool
    if pool is None:  # read_threads = 0: on the event loop itself
        return job()
    return await asyncio.wrap_future(pool.submit(job))
