"""Automatic drafts and label scores on SQLite and PostgreSQL: a draft and its scores are one
write; reruns make a new revision only when the text changes; reviewed drafts and people's labels
are never touched; scores go with their label; which features an explainer has finished."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from app.errors import ConfigError, PreconditionFailedError
from app.store import labels as store
from app.store.db import read_session
from app.store.labels import ScoreRecord
from app.store.tables import LabelExplanation, LabelScore

SAE_ID = "1-res-topk-64"


def _score(method: str = "detection", score: float | None = 0.8, seed: int = 0,
           scorer: str = "oracle") -> ScoreRecord:
    return ScoreRecord(method=method, scorer=scorer, score=score, control_score=0.5,
                       n_windows=40, seed=seed, run_id=1, details={"tp": 16})


def _save(engine, index: int, text: str, *, seed: int = 0, scores=None):
    return store.save_explanation(
        engine, sae_id=SAE_ID, index=index, explainer="pattern", description=text, seed=seed,
        run_id=1, scores=[_score(seed=seed), _score("fuzzing", seed=seed)]
        if scores is None else scores)


def _history(engine, index: int):
    with read_session(engine) as session:
        return [(r.version, r.action, r.actor)
                for r in store.feature_history(session=session, sae_id=SAE_ID, index=index)]


def test_a_draft_with_its_scores_and_reruns(engine) -> None:
    person = store.create_label(engine, sae_id=SAE_ID, index=4, author="ann",
                                edit=store.LabelEdit(description="mine"))
    saved = _save(engine, 4, "fires on ' value'")
    assert saved.action == "created"
    label = saved.label
    assert (label.author, label.author_kind, label.status, label.version) == (
        "autointerp:pattern", "automatic", "draft", 1)
    with read_session(engine) as session:
        assert store.shown_labels(session=session, sae_id=SAE_ID, indices=[4])[4].id == person.id
        scores = store.scores_of(session=session, label_ids=[label.id, person.id])
    assert sorted(s.method for s in scores[label.id]) == ["detection", "fuzzing"]
    assert scores[label.id][0].details == {"tp": 16} and person.id not in scores
    # Same text again (another seed): no new revision, one more set of scores.
    assert _save(engine, 4, "fires on ' value'", seed=1).action == "unchanged"
    # New text: a new revision by the explainer; the old version's scores are not current.
    updated = _save(engine, 4, "fires on ' values'")
    assert (updated.action, updated.label.version) == ("updated", 2)
    assert _history(engine, 4)[:2] == [(2, "edit", "autointerp:pattern"),
                                       (1, "create", "autointerp:pattern")]
    with read_session(engine) as session:
        assert len(store.scores_of(session=session, label_ids=[label.id])[label.id]) == 2
        every = store.scores_of(session=session, label_ids=[label.id], current_only=False)
        assert len(every[label.id]) == 6
        mine = store.own_label(session=session, sae_id=SAE_ID, index=4, author="ann")
    assert (mine.description, mine.version) == ("mine", 1)  # the person's label untouched


def test_reviewed_drafts_are_kept(engine) -> None:
    label = _save(engine, 5, "a").label
    store.review_label(engine, label_id=label.id, status="accepted", reviewer="rev")
    kept = _save(engine, 5, "b")
    assert kept.action == "kept" and kept.label.description == "a"
    with read_session(engine) as session:
        shown = store.shown_labels(session=session, sae_id=SAE_ID, indices=[5])[5]
        assert (shown.id, shown.description) == (label.id, "a")
        finished, reviewed = store.explained_features(
            session=session, sae_id=SAE_ID, explainer="pattern", seed=0,
            methods=["detection"], scorer="oracle")
    assert (finished, reviewed) == (set(), {5})


def test_explained_features(engine) -> None:
    _save(engine, 1, "a")  # both methods, seed 0
    _save(engine, 2, "b", scores=[_score("detection")])  # detection only
    _save(engine, 3, "c", seed=1)
    _save(engine, 6, "d", scores=[])
    with read_session(engine) as session:
        def done(methods, seed=0, scorer="oracle"):
            return store.explained_features(session=session, sae_id=SAE_ID, explainer="pattern",
                                            seed=seed, methods=methods, scorer=scorer)[0]
        assert done(["detection", "fuzzing"]) == {1}
        assert done(["detection"]) == {1, 2}
        assert done(["detection"], scorer="other") == set()
        assert done(["fuzzing"], seed=1) == {3}
        assert done([]) == {1, 2, 6}


def test_scores_of_a_persons_label_and_cascade(engine) -> None:
    person = store.create_label(engine, sae_id=SAE_ID, index=8, author="ann",
                                edit=store.LabelEdit(description="commas"))
    store.save_scores(engine, label_id=person.id, expected_version=1,
                      scores=[_score("fuzzing", score=None)])
    with pytest.raises(PreconditionFailedError, match="version"):
        store.save_scores(engine, label_id=person.id, expected_version=0, scores=[_score()])
    with pytest.raises(ConfigError, match="method"):
        store.save_scores(engine, label_id=person.id, expected_version=1,
                          scores=[_score("vibes")])
    # The same method, scorer and seed again replaces the score.
    store.save_scores(engine, label_id=person.id, expected_version=1,
                      scores=[_score("fuzzing", score=0.7)])
    with read_session(engine) as session:
        (only,) = store.scores_of(session=session, label_ids=[person.id])[person.id]
    assert (only.score, only.label_version, only.created_at.tzinfo is not None) == (
        0.7, 1, True)
    draft = _save(engine, 8, "e").label
    for label in (person, draft):
        store.withdraw_label(engine, label_id=label.id, expected_version=1, actor="ann")
    with read_session(engine) as session:
        assert session.scalar(select(func.count()).select_from(LabelScore)) == 0
        assert session.scalar(select(func.count()).select_from(LabelExplanation)) == 0


def test_bad_explanations_are_refused(engine) -> None:
    for text in ("", "x" * 2001, "a\x00b"):
        with pytest.raises(ConfigError):
            _save(engine, 9, text)
