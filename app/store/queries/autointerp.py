"""Reads for automatic interpretation: which features to explain, where an SAE's weights and
model are, and the live run's stored token sequences (the source of windows at zero)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import and_, exists, select
from sqlalchemy.orm import Session

from app.errors import ConfigError
from app.store import codec
from app.store.labels.reads import may_be_shown
from app.store.queries.runs import live_run
from app.store.queries.saes import get_sae_brief
from app.store.tables import SAE, Feature, Label, Model, Run, Sequence


@dataclass(frozen=True)
class ExplainTargets:
    """The live run's features among those asked for: `alive` (fired at least once, ascending)
    and how many asked-for features never fired (nothing to explain)."""

    run_id: int
    alive: list[int]
    n_dead: int


@dataclass(frozen=True)
class SAEWeights:
    """What loading an SAE with its model needs, as the database recorded it."""

    sae_id: str
    model_id: str
    model_source: str | None
    hook_name: str
    path: str
    run_id: int
    context_size: int


def explain_targets(*, session: Session, sae_id: str, indices: list[int] | None,
                    unlabeled: bool = False) -> ExplainTargets:
    """Features of `sae_id`'s live run to explain: `indices` (None: all), only those without a
    shown label when `unlabeled`. Indices outside the SAE are a ConfigError."""
    sae = get_sae_brief(session=session, sae_id=sae_id)
    run = live_run(session, sae)
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < sae.d_sae]
        if bad:
            raise ConfigError(f"SAE {sae_id!r} has features 0..{sae.d_sae - 1}; "
                              f"there is no feature {bad[0]}")
    stmt = select(Feature.index, Feature.count).where(Feature.run_id == run.id)
    if unlabeled:
        shown = exists().where(and_(Label.sae_id == sae_id, Label.feature_index == Feature.index,
                                    Label.description != "", may_be_shown()))
        stmt = stmt.where(~shown)
    rows = session.execute(stmt.order_by(Feature.index)).all()
    if indices is not None:
        wanted = set(indices)
        rows = [r for r in rows if r.index in wanted]
    alive = [r.index for r in rows if r.count > 0]
    return ExplainTargets(run_id=run.id, alive=alive, n_dead=len(rows) - len(alive))


def alive_features(*, session: Session, run_id: int) -> list[int]:
    """Every feature of a run that fired at least once, ascending."""
    return list(session.scalars(select(Feature.index).where(
        Feature.run_id == run_id, Feature.count > 0).order_by(Feature.index)))


def sae_weights(*, session: Session, sae_id: str) -> SAEWeights:
    """Where the SAE's weights are and which model (and hook) its live run read."""
    sae = get_sae_brief(session=session, sae_id=sae_id)
    run = live_run(session, sae)
    row = session.execute(
        select(SAE.hook_name, Model.source, Run.context_size)
        .select_from(SAE).outerjoin(Model, Model.id == SAE.model_id)
        .join(Run, Run.id == run.id).where(SAE.id == sae_id)).one()
    return SAEWeights(sae_id=sae_id, model_id=sae.model_id, model_source=row.source,
                      hook_name=row.hook_name, path=sae.path, run_id=run.id,
                      context_size=row.context_size)


def sequence_indices(*, session: Session, run_id: int) -> list[int]:
    """The indices of every sequence the run stored, ascending."""
    return list(session.scalars(select(Sequence.seq_index).where(Sequence.run_id == run_id)
                                .order_by(Sequence.seq_index)))


def sequence_tokens(*, session: Session, run_id: int, seq_indices: list[int]
                    ) -> dict[int, np.ndarray]:
    """Token ids (int32) of these stored sequences, by sequence index."""
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(seq_indices), 500):  # bounded IN lists
        chunk = seq_indices[start:start + 500]
        for seq_index, blob in session.execute(
                select(Sequence.seq_index, Sequence.tokens)
                .where(Sequence.run_id == run_id, Sequence.seq_index.in_(chunk))):
            out[seq_index] = codec.from_blob(blob, codec.INT32).copy()
    return out
