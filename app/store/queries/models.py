"""Reads of the language models: the model list (every page's top bar) and their vocabularies."""

from __future__ import annotations

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from app.errors import NotFoundError
from app.store import codec
from app.store.read_models import ModelInfo
from app.store.tables import SAE, Model

# Statements built once: building and coercing SQLAlchemy constructs per request costs more than
# SQLite answering them.
_sae_t, _model_t = SAE.__table__, Model.__table__
_SAE_IDS = select(_sae_t.c.model_id, _sae_t.c.id).order_by(_sae_t.c.id)
_MODELS = select(
    _model_t.c.id, _model_t.c.source, _model_t.c.architecture, _model_t.c.d_model,
    _model_t.c.n_layers, _model_t.c.vocab_size, _model_t.c.bos_token_id,
    _model_t.c.has_chat_template,
).order_by(_model_t.c.id)
_VOCAB_SHA = select(_model_t.c.token_strings_sha).where(_model_t.c.id == bindparam("model_id"))
_VOCAB_BLOB = select(_model_t.c.token_strings).where(_model_t.c.id == bindparam("model_id"))


def list_models(*, session: Session) -> list[ModelInfo]:
    """Models with their SAE ids (Core statements: every page's top bar calls this)."""
    conn = session.connection()
    sae_ids: dict[str, list[str]] = {}
    for model_id, sae_id in conn.execute(_SAE_IDS):
        sae_ids.setdefault(model_id, []).append(sae_id)
    return [ModelInfo(*row, sae_ids=sae_ids.get(row.id, [])) for row in conn.execute(_MODELS)]


def get_model_vocab(*, session: Session, model_id: str) -> list[str]:
    """Display string of every token id of the model (cached across requests by content hash)."""
    conn = session.connection()
    sha = conn.execute(_VOCAB_SHA, {"model_id": model_id}).scalar()
    if sha is None:
        raise NotFoundError(f"no model {model_id!r} in this database; see /api/v1/models")
    cached = codec.cached_vocab(sha)
    if cached is not None:
        return cached
    blob = conn.execute(_VOCAB_BLOB, {"model_id": model_id}).scalar()
    return codec.decode_vocab(blob, sha)


def token_string(vocab: list[str], token_id: int) -> str:
    """A token's display string; an id the stored vocabulary lacks reads as "<id>"."""
    return vocab[token_id] if 0 <= token_id < len(vocab) else f"<{token_id}>"
