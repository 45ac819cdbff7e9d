"""The FastAPI application: create_app(settings) wires routers, error handlers and the lifespan
(schema upgrade, then the model and its SAEs loading on the model thread)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from starlette.concurrency import run_in_threadpool

from app.api import openai_schemas, steer_schemas
from app.api.auth import check_auth_settings, install_gate
from app.api.deps import current_user
from app.api.errors import install_error_handlers
from app.api.middleware import HttpEdge
from app.api.model_service import EngineState
from app.api.model_worker import ModelWorker
from app.api.public_paths import public_path
from app.api.routes import (
    chat,
    features,
    label_scores,
    labels,
    models,
    saes,
    search,
    steer,
    steer_library,
)
from app.errors import SaescopeError
from app.settings import Settings, get_settings
from app.store import queries
from app.store.db import make_engine, read_session, upgrade

log = logging.getLogger(__name__)

# The body limit of routes whose router sets none (read routes take no body at all).
DEFAULT_MAX_BODY_BYTES = 64 * 1024


def _sae_specs(app: FastAPI) -> list[Any]:
    """The SAEs the database lists, as the engine's plain specs: precomputed ones first (the
    first one's model is the default), then by id."""
    from app.engine.service import SAESpec

    with read_session(app.state.db_engine) as session:
        sources = {m.id: m.source for m in queries.list_models(session=session)}
        saes = sorted(queries.list_saes(session=session), key=lambda s: (s.run is None, s.id))
    return [SAESpec(sae_id=s.id, model_id=s.model_id, hook_name=s.hook_name, path=s.path,
                    model_source=sources.get(s.model_id)) for s in saes]


def _load_engine_service(app: FastAPI) -> None:
    """Runs on the model thread: imports torch and loads the model, then flips the state.

    state.message reaches API clients (the 503 of model calls), so paths in it are shortened
    (app/api/public_paths.py); the log keeps them whole.
    """
    state: EngineState = app.state.engine_state
    settings: Settings = app.state.settings
    try:
        from app.engine.service import EngineService

        service = EngineService.load(saes=_sae_specs(app), model=settings.model,
                                     device=settings.device, dtype=settings.dtype,
                                     cache_dir=settings.cache_dir)
    except SaescopeError as exc:
        state.message = public_path(str(exc), home=settings.home)
        state.status = "failed"
        log.warning("text search is off: %s", exc)
    except Exception as exc:  # noqa: BLE001 - the server still serves precomputed data
        state.message = public_path(
            f"loading the model failed ({type(exc).__name__}: {exc})", home=settings.home)
        state.status = "failed"
        log.exception("loading the model failed; text search is off")
    else:
        state.service = service
        state.message = f"model {service.model_id} with SAEs {', '.join(service.saes) or 'none'}"
        state.status = "ready"
        log.info("text search ready: %s", state.message)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    await run_in_threadpool(upgrade, settings.db_url)
    if settings.load_model:
        app.state.engine_state.status = "loading"
        app.state.engine_state.message = "the model is loading"
        # Loading takes tens of seconds for a real model; the API serves precomputed pages
        # meanwhile and answers model calls with 503 + Retry-After until it is ready.
        app.state.model_worker.submit(lambda: _load_engine_service(app))
    try:
        yield
    finally:
        app.state.model_worker.close()
        if app.state.read_pool is not None:
            app.state.read_pool.shutdown(wait=False, cancel_futures=True)
        app.state.db_engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    check_auth_settings(settings)
    app = FastAPI(
        title="saescope",
        summary="Explore, label and search sparse-autoencoder features of language models.",
        version="0.1.0",
        lifespan=lifespan,
        # /docs is the web layer's page (app/web/docs.py): Swagger UI from an installed package.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.db_engine = make_engine(settings.db_url)  # connects lazily
    app.state.model_worker = ModelWorker(capacity=settings.model_queue_size)
    # Hot reads run here (api.deps.run_read): a few threads, so concurrent requests queue FIFO
    # rather than time-slicing the GIL across the default forty.
    app.state.read_pool = ThreadPoolExecutor(
        max_workers=settings.read_threads, thread_name_prefix="saescope-read"
    ) if settings.read_threads > 0 else None
    app.state.engine_state = EngineState()
    app.state.label_scorer = _label_scorer(app)
    install_error_handlers(app)
    # The gate first, so the edge (added last, outermost) puts its headers on the gate's refusals.
    install_gate(app, settings)
    app.add_middleware(HttpEdge)
    # Bodies are refused with 413 past a per-router limit, counted as they arrive (chunked or
    # not) and before any parsing: model routes take one text; a router may set its own
    # (APIRouter(max_body_size=...)) for larger uploads. Reading needs a signed-in viewer under
    # auth=token; label routes check roles themselves.
    signed_in = [Depends(current_user)]
    for module in (models, saes, features):
        app.include_router(module.router, max_body_size=DEFAULT_MAX_BODY_BYTES,
                           dependencies=signed_in)
    app.include_router(search.router, max_body_size=search.max_body_bytes(settings),
                       dependencies=signed_in)
    app.include_router(labels.router, max_body_size=DEFAULT_MAX_BODY_BYTES)
    app.include_router(label_scores.router, max_body_size=DEFAULT_MAX_BODY_BYTES)
    app.include_router(labels.transfer_router, max_body_size=labels.IMPORT_MAX_BYTES)
    # Generation costs CPU: under auth=token only a signed-in person may run one.
    app.include_router(steer.router, max_body_size=steer.MAX_BODY_BYTES, dependencies=signed_in)
    app.include_router(steer_library.router, max_body_size=steer_library.MAX_BODY_BYTES,
                       dependencies=signed_in)
    # OpenAI-compatible chat for the loaded model (OpenAI clients send Bearer, no Origin).
    app.include_router(chat.router, max_body_size=chat.MAX_BODY_BYTES, dependencies=signed_in)
    _mount_web(app)
    _document_deployment_bounds(app, settings)
    return app


def _label_scorer(app: FastAPI) -> Any:
    """Scoring a label on request (POST .../labels/{id}/score): the pipeline's score_label over
    the model this server loads, on the model worker (app/server_scoring.py)."""
    from app.server_scoring import ServerLabelScorer

    return ServerLabelScorer(db=app.state.db_engine, engine_state=app.state.engine_state,
                             worker=app.state.model_worker, home=app.state.settings.home)


def _document_deployment_bounds(app: FastAPI, settings: Settings) -> None:
    """OpenAPI with this deployment's bounds where a route checks a setting, built once."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            steer_schemas.document_bounds(schema, max_new_tokens=settings.steer_max_new_tokens)
            openai_schemas.document_bounds(schema, max_new_tokens=settings.steer_max_new_tokens,
                                           model=settings.model)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _mount_web(app: FastAPI) -> None:
    """HTML pages and static files, when the web layer is installed alongside the API."""
    try:
        from app.web import label_pages, pages
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("app.web"):
            return
        raise
    from fastapi.staticfiles import StaticFiles

    from app.web import docs, steer_pages
    from app.web.error_pages import render_html_error
    from app.web.templating import STATIC_DIR, STATIC_PREFIX

    app.state.html_error_renderer = render_html_error
    if STATIC_DIR.is_dir():
        app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="static")
    if docs.mount_swagger_assets(app):
        app.include_router(docs.router, max_body_size=DEFAULT_MAX_BODY_BYTES)
    # Before pages.router, whose /{model_id}/{sae_id} would take /labels/search, and
    # /{model_id}/{sae_id}/{index} /steer/runs/{id}.
    app.include_router(label_pages.router, max_body_size=DEFAULT_MAX_BODY_BYTES)
    app.include_router(steer_pages.router, max_body_size=DEFAULT_MAX_BODY_BYTES,
                       dependencies=[Depends(label_pages.page_user)])
    app.include_router(pages.router, max_body_size=DEFAULT_MAX_BODY_BYTES,
                       dependencies=[Depends(label_pages.page_user)])
