"""Model calls: text search over an SAE's features, and one feature's activations on a text.

Both run on the model worker (bounded queue, one thread) and never on the event loop.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import EngineStateDep, ModelWorkerDep, SessionDep, SettingsDep
from app.api.schemas import (
    MAX_TEXT_CHARS_PER_TOKEN,
    MODEL_CALL_RESPONSES,
    FeatureActivationsOut,
    SearchIn,
    SearchOut,
    TextIn,
)
from app.errors import ConfigError, NotFoundError
from app.store import queries

router = APIRouter(prefix="/api/v1/saes/{sae_id}", tags=["search"])


def _check_chars(text: str, max_tokens: int) -> None:
    limit = max_tokens * MAX_TEXT_CHARS_PER_TOKEN
    if len(text) > limit:
        raise ConfigError(
            f"text is {len(text)} characters; the limit is {limit} "
            f"({max_tokens} tokens, SAESCOPE_MAX_TEXT_TOKENS)"
        )


def _tokenize_capped(service, *, sae_id: str, text: str, max_tokens: int) -> list[int]:
    ids = service.tokenize(sae_id=sae_id, text=text)
    if len(ids) > max_tokens:
        raise ConfigError(
            f"text is {len(ids)} tokens; the limit is {max_tokens} (SAESCOPE_MAX_TEXT_TOKENS): "
            "shorten the text"
        )
    return ids


def _sae_or_404(session, sae_id: str) -> queries.SAEInfo:
    return queries.get_sae(session=session, sae_id=sae_id)


@router.post("/search", response_model=SearchOut, responses=MODEL_CALL_RESPONSES)
async def search_text(
    body: SearchIn,
    sae_id: str,
    session: SessionDep,
    settings: SettingsDep,
    worker: ModelWorkerDep,
    engine_state: EngineStateDep,
) -> Response:
    """Tokens of the text, the top features on each token, and the features firing most."""
    _check_chars(body.text, settings.max_text_tokens)
    sae = await run_in_threadpool(_sae_or_404, session, sae_id)
    service = engine_state.require()

    def job() -> dict:
        ids = _tokenize_capped(service, sae_id=sae_id, text=body.text,
                               max_tokens=settings.max_text_tokens)
        return service.search(sae_id=sae_id, ids=ids, top_k=body.top_k,
                              n_features=body.n_features)

    result = await worker.run(job)
    wanted = {f["index"] for f in result["top_features"]}
    wanted.update(f["index"] for row in result["per_token"] for f in row)
    labels = await run_in_threadpool(
        lambda: queries.get_labels(session=session, sae_id=sae_id, indices=sorted(wanted))
    )
    return Response(content=_search_json(result, labels, sae_id=sae_id, model_id=sae.model_id),
                    media_type="application/json")


def _search_json(result: dict[str, Any], labels: dict[int, queries.LabelInfo], *, sae_id: str,
                 model_id: str) -> bytes:
    """SearchOut's JSON from the service's plain dicts, without a pydantic model per feature
    (~350 of them for 64 tokens: they cost more than the rest of the route). The service's
    values are finite floats (activations of a finite model) and ints; tests/api validates the
    output against SearchOut."""
    names = {i: found.description for i, found in labels.items() if found.description}
    out = {
        "sae_id": sae_id, "model_id": model_id, "tokens": result["tokens"],
        "token_ids": result["token_ids"], "special": result["special"],
        "per_token": [[{"index": f["index"], "value": f["value"], "label": names.get(f["index"])}
                       for f in row] for row in result["per_token"]],
        "top_features": [{**f, "label": names.get(f["index"])} for f in result["top_features"]],
    }
    return json.dumps(out, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode()


@router.post("/features/{index}/activations", response_model=FeatureActivationsOut,
             responses=MODEL_CALL_RESPONSES)
async def feature_activations(
    body: TextIn,
    sae_id: str,
    index: Annotated[int, Path(ge=0)],
    session: SessionDep,
    settings: SettingsDep,
    worker: ModelWorkerDep,
    engine_state: EngineStateDep,
) -> FeatureActivationsOut:
    """One feature's activation on every token of the text."""
    _check_chars(body.text, settings.max_text_tokens)
    sae = await run_in_threadpool(_sae_or_404, session, sae_id)
    if index >= sae.d_sae:
        raise NotFoundError(
            f"SAE {sae_id!r} has features 0..{sae.d_sae - 1}; there is no feature {index}"
        )
    service = engine_state.require()

    def job() -> dict:
        ids = _tokenize_capped(service, sae_id=sae_id, text=body.text,
                               max_tokens=settings.max_text_tokens)
        return service.feature_activations(sae_id=sae_id, ids=ids, index=index)

    result = await worker.run(job)
    values = result["values"]
    # The max over ordinary tokens: BOS often carries large, meaningless activations.
    candidates = [i for i, s in enumerate(result["special"]) if not s] or list(range(len(values)))
    best = max(candidates, key=values.__getitem__) if values else 0
    return FeatureActivationsOut(
        sae_id=sae_id, model_id=sae.model_id, index=index, tokens=result["tokens"],
        token_ids=result["token_ids"], values=values, special=result["special"],
        maxValue=values[best] if values else 0.0, maxValueTokenIndex=best,
    )
