"""Scoring a label that already exists (a person's, or an accepted draft): the same detection
and fuzzing as `saescope explain`, with its control, stored for the label's current version."""

from __future__ import annotations

from sqlalchemy import Engine

from app.errors import ConfigError, NotFoundError
from app.pipeline.autointerp.backends import ChatBackend
from app.pipeline.autointerp.explain_job import control_explanation
from app.pipeline.autointerp.negatives import SequencePool
from app.pipeline.autointerp.scoring import DETECTION, ScoringOptions, score_explanation
from app.store import queries
from app.store.db import read_session
from app.store.labels.reads import label_by_id
from app.store.labels.scores import ScoreRecord, save_scores
from app.store.tables import SCORE_METHODS


def score_label(
    engine: Engine, *, label_id: int, scorer: ChatBackend,
    methods: tuple[str, ...] = SCORE_METHODS, seed: int = 0,
    negatives: SequencePool | None = None, options: ScoringOptions | None = None,
) -> list[ScoreRecord]:
    """Score label `label_id`'s description with `scorer` and store the scores (with the label
    version they scored). Detection needs `negatives` (windows at zero: negatives.py); a label
    edited while it was being scored is PreconditionFailedError and nothing is stored."""
    if DETECTION in methods and negatives is None:
        raise ConfigError("detection scoring needs windows where the feature is zero; pass "
                          "negatives, or score with fuzzing only")
    with read_session(engine) as session:
        label = label_by_id(session=session, label_id=label_id)
        if label is None:
            raise NotFoundError(f"no label {label_id}")
        if not label.description.strip():
            raise ConfigError(f"label {label_id} has no description to score")
        feature = queries.get_feature(session=session, sae_id=label.sae_id,
                                      index=label.feature_index)
        alive = queries.alive_features(session=session, run_id=feature.run_id)
        control = control_explanation(session, feature=feature, alive=alive, seed=seed)
    scores = [score_explanation(feature, label.description, method=m, scorer=scorer, seed=seed,
                                control=control, negatives=negatives, options=options)
              for m in methods]
    save_scores(engine, label_id=label_id, expected_version=label.version, scores=scores)
    return scores
