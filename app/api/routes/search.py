"""Model calls: text search over an SAE's features, and one feature's activations on a text.

Both run on the model worker (bounded queue, one thread) and never on the event loop. Each is one
job there: the SAE check, the tokenizer, the model and the label lookup, in one read session, so
a request crosses threads once (each crossing costs a thread wake-up).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Path, Request, Response
from sqlalchemy.orm import Session

from app.api.deps import EngineStateDep, ModelWorkerDep, SaeIdPath, SettingsDep, run_read
from app.api.model_service import EngineState, ModelService
from app.api.model_worker import ModelWorker
from app.api.schemas import (
    MAX_TEXT_CHARS_PER_TOKEN,
    MODEL_CALL_RESPONSES,
    FeatureActivationsOut,
    SearchIn,
    SearchOut,
    TextIn,
)
from app.errors import ConfigError, NotFoundError
from app.settings import Settings
from app.store import queries
from app.store.db import read_session
from app.store.read_models import LabelInfo, SAEBrief

router = APIRouter(prefix="/api/v1/saes/{sae_id}", tags=["search"])
T = TypeVar("T")


def max_body_bytes(settings: Settings) -> int:
    """The body limit of these routes (app.main): the largest text they take, at up to 6 bytes
    a character (a JSON \\u escape), and room for the other fields."""
    return settings.max_text_tokens * MAX_TEXT_CHARS_PER_TOKEN * 6 + 4096


def _check_chars(text: str, max_tokens: int) -> None:
    limit = max_tokens * MAX_TEXT_CHARS_PER_TOKEN
    if len(text) > limit:
        raise ConfigError(
            f"text is {len(text)} characters; the limit is {limit} "
            f"({max_tokens} tokens, SAESCOPE_MAX_TEXT_TOKENS)"
        )


def _tokenize_capped(service: ModelService, *, sae_id: str, text: str,
                     max_tokens: int) -> list[int]:
    ids = service.tokenize(sae_id=sae_id, text=text)
    if len(ids) > max_tokens:
        raise ConfigError(
            f"text is {len(ids)} tokens; the limit is {max_tokens} (SAESCOPE_MAX_TEXT_TOKENS): "
            "shorten the text"
        )
    return ids


def _check_sae(session: Session, sae_id: str, index: int | None = None) -> SAEBrief:
    """The SAE's brief row (model_id, d_sae); NotFoundError for an unknown SAE or index."""
    sae = queries.get_sae_brief(session=session, sae_id=sae_id)
    if index is not None and index >= sae.d_sae:
        raise NotFoundError(
            f"SAE {sae_id!r} has features 0..{sae.d_sae - 1}; there is no feature {index}"
        )
    return sae


async def _model_call(
    request: Request, *, engine_state: EngineState, worker: ModelWorker, sae_id: str,
    index: int | None, fn: Callable[[ModelService, Session, Any], T],
) -> T:
    """fn(service, session, sae) on the model worker, after the SAE check in the same session.

    An unknown SAE or index is a 404 whatever the model's state: when the model is not ready the
    check runs first on its own, so the 404 comes before require()'s 503.
    """
    if engine_state.status != "ready":
        await run_read(request, lambda session: _check_sae(session, sae_id, index))
    service = engine_state.require()
    db = request.app.state.db_engine

    def job() -> T:
        with read_session(db) as session:
            sae = _check_sae(session, sae_id, index)
            return fn(service, session, sae)

    return await worker.run(job)


@router.post("/search", response_model=SearchOut, responses=MODEL_CALL_RESPONSES)
async def search_text(
    body: SearchIn,
    sae_id: SaeIdPath,
    request: Request,
    settings: SettingsDep,
    worker: ModelWorkerDep,
    engine_state: EngineStateDep,
) -> Response:
    """Tokens of the text, the top features on each token, and the features firing most."""
    _check_chars(body.text, settings.max_text_tokens)

    def search(service: ModelService, session: Session, sae: Any) -> tuple[dict, dict, str]:
        ids = _tokenize_capped(service, sae_id=sae_id, text=body.text,
                               max_tokens=settings.max_text_tokens)
        result = service.search(sae_id=sae_id, ids=ids, top_k=body.top_k,
                                n_features=body.n_features)
        wanted = {f["index"] for f in result["top_features"]}
        wanted.update(f["index"] for row in result["per_token"] for f in row)
        labels = queries.get_labels(session=session, sae_id=sae_id, indices=sorted(wanted))
        return result, labels, sae.model_id

    result, labels, model_id = await _model_call(
        request, engine_state=engine_state, worker=worker, sae_id=sae_id, index=None, fn=search)
    # Serialized here, on the event loop: the model thread is the scarcer one.
    return Response(content=_search_json(result, labels, sae_id=sae_id, model_id=model_id),
                    media_type="application/json")


def _search_json(result: dict[str, Any], labels: dict[int, LabelInfo], *, sae_id: str,
                 model_id: str) -> bytes:
    """SearchOut's JSON from the service's plain dicts, dumped by orjson: a pydantic model per
    listed feature would cost more than the rest of the route. tests/api validates the output
    against SearchOut."""
    names = {i: found.description for i, found in labels.items() if found.description}
    out = {
        "sae_id": sae_id, "model_id": model_id, "tokens": result["tokens"],
        "token_ids": result["token_ids"], "special": result["special"],
        "per_token": [[{"index": f["index"], "value": f["value"], "label": names.get(f["index"])}
                       for f in row] for row in result["per_token"]],
        "top_features": [{**f, "label": names.get(f["index"])} for f in result["top_features"]],
    }
    return orjson.dumps(out)


@router.post("/features/{index}/activations", response_model=FeatureActivationsOut,
             responses=MODEL_CALL_RESPONSES)
async def feature_activations(
    body: TextIn,
    sae_id: SaeIdPath,
    index: Annotated[int, Path(ge=0, le=queries.MAX_ID)],
    request: Request,
    settings: SettingsDep,
    worker: ModelWorkerDep,
    engine_state: EngineStateDep,
) -> FeatureActivationsOut:
    """One feature's activation on every token of the text."""
    _check_chars(body.text, settings.max_text_tokens)

    def activations(service: ModelService, session: Session, sae: Any) -> tuple[dict, str]:
        ids = _tokenize_capped(service, sae_id=sae_id, text=body.text,
                               max_tokens=settings.max_text_tokens)
        return service.feature_activations(sae_id=sae_id, ids=ids, index=index), sae.model_id

    result, model_id = await _model_call(
        request, engine_state=engine_state, worker=worker, sae_id=sae_id, index=index,
        fn=activations)
    values = result["values"]
    # The max over ordinary tokens: BOS often carries large, meaningless activations.
    candidates = [i for i, s in enumerate(result["special"]) if not s] or list(range(len(values)))
    best = max(candidates, key=values.__getitem__) if values else 0
    return FeatureActivationsOut(
        sae_id=sae_id, model_id=model_id, index=index, tokens=result["tokens"],
        token_ids=result["token_ids"], values=values, special=result["special"],
        maxValue=values[best] if values else 0.0, maxValueTokenIndex=best,
    )
