"""Scores of a label's current text, the queue's draft orders against a brute-force ordering, and
an SAE's automatic-description summary, on SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest

from app.store import labels as store
from app.store.db import read_session
from app.store.labels import LabelEdit, ScoreRecord
from tests.factories import synthetic_run, write_records

SAE_ID = "1-res-topk-64"


def _score(method: str, score: float | None, *, scorer: str = "keyword", seed: int = 0,
           control: float | None = 0.5) -> ScoreRecord:
    return ScoreRecord(method=method, scorer=scorer, score=score, control_score=control,
                       n_windows=20, seed=seed)


def _draft(engine, index: int, scores: list[float | None], *, explainer: str = "pattern",
           text: str | None = None):
    records = [_score(m, s) for m, s in zip(("detection", "fuzzing"), scores, strict=False)]
    return store.save_explanation(
        engine, sae_id=SAE_ID, index=index, explainer=explainer,
        description=text or f"{explainer} {index}", seed=0, run_id=None, scores=records).label


def _current(engine, label_id: int) -> list[tuple[str, float | None, int]]:
    with read_session(engine) as session:
        found = store.scores_of(session=session, label_ids=[label_id]).get(label_id, [])
    return sorted((s.method, s.score, s.label_version) for s in found)


def test_a_score_follows_the_text_not_the_version(engine) -> None:
    write_records(engine, synthetic_run(d_sae=16, n_dead=0))
    draft = _draft(engine, 2, [0.75, 0.5])
    reviewed = store.review_label(engine, label_id=draft.id, status="accepted", reviewer="rev")
    assert reviewed.version == 2
    # Accepting a draft keeps its scores: its text is the one scored.
    assert _current(engine, draft.id) == [("detection", 0.75, 1), ("fuzzing", 0.5, 1)]
    person = store.create_label(engine, sae_id=SAE_ID, index=3, author="ann",
                                edit=LabelEdit(description="commas"))
    store.save_scores(engine, label_id=person.id, expected_version=1,
                      scores=[_score("fuzzing", 0.625)])
    tagged = store.update_label(engine, label_id=person.id, expected_version=1,
                                edit=LabelEdit(description="commas", tags=["punct"]),
                                actor="ann")
    assert _current(engine, person.id) == [("fuzzing", 0.625, 1)]  # tags changed, not the text
    edited = store.update_label(engine, label_id=person.id, expected_version=tagged.version,
                                edit=LabelEdit(description="commas and periods"), actor="ann")
    assert _current(engine, person.id) == []  # a new text: not scored yet
    store.update_label(engine, label_id=person.id, expected_version=edited.version,
                       edit=LabelEdit(description="commas"), actor="ann")
    assert _current(engine, person.id) == [("fuzzing", 0.625, 1)]  # that text again
    # Scoring the same text again at a later version: one score per method, scorer and seed.
    store.save_scores(engine, label_id=person.id, expected_version=4,
                      scores=[_score("fuzzing", 0.875)])
    assert _current(engine, person.id) == [("fuzzing", 0.875, 4)]


def _expected(engine, *, mode: str, order: str, user: str, alive: list[int]) -> list[int]:
    """The queue's order by brute force over the store's reads."""
    with read_session(engine) as session:
        labels = store.labels_of(session=session, sae_id=SAE_ID, indices=alive)
        every = [lb for ls in labels.values() for lb in ls]
        scores = store.scores_of(session=session, label_ids=[lb.id for lb in every])
    rows = []
    for index in alive:
        mine = labels.get(index, [])
        drafts = [lb for lb in mine if lb.author_kind == "automatic" and lb.status == "draft"]
        if not drafts:
            continue
        if mode == "unlabeled":
            shown = store.pick_shown(mine)
            if (shown is not None and shown.description) or any(lb.author == user
                                                                 for lb in mine):
                continue
        per_draft = [[s.score for s in scores.get(d.id, []) if s.score is not None]
                     for d in drafts]
        means = [sum(v) / len(v) for v in per_draft if v]
        best = max(means) if means else None
        key = 0.0 if best is None else (best if order == "draft_lowest" else -best)
        rows.append((best is None, key, index))
    return [index for _, _, index in sorted(rows)]


def _queue(engine, *, mode: str, order: str, user: str) -> list[int]:
    """Every feature the queue hands `user`, in turn (each skipped to get the next)."""
    got = []
    while (nxt := store.next_feature(engine, sae_id=SAE_ID, user=user, order=order,
                                     mode=mode)) is not None:
        got.append(nxt[0])
        store.skip_feature(engine, sae_id=SAE_ID, index=nxt[0], user=user)
    return got


@pytest.mark.parametrize("seed", [0, 1])
def test_draft_orders_match_a_brute_force_ordering(engine, seed) -> None:
    run = synthetic_run(d_sae=48, n_dead=4, seed=seed)
    write_records(engine, run)
    alive = [i for i in range(48) if run.features.count[i] > 0]
    rng = np.random.default_rng(seed)
    grid = [k / 8 for k in range(9)]  # exact in binary: means compare exactly
    for index in alive:
        kind = rng.integers(6)
        if kind == 0:
            continue  # no draft
        scores = [grid[rng.integers(9)] if rng.random() < 0.8 else None for _ in range(2)]
        draft = _draft(engine, index, scores)
        if kind == 1:  # a second explainer's draft, maybe better
            _draft(engine, index, [grid[rng.integers(9)]], explainer="local")
        elif kind == 2:  # the text changed since it was scored: its scores no longer count
            store.save_explanation(engine, sae_id=SAE_ID, index=index, explainer="pattern",
                                   description=f"new text {index}", seed=1, run_id=None,
                                   scores=[])
        elif kind == 3:  # a person labeled it (shown): out of the unlabeled queue
            store.create_label(engine, sae_id=SAE_ID, index=index, author="ann",
                               edit=LabelEdit(description=f"person {index}"))
        elif kind == 4 and rng.random() < 0.5:  # rejected: no longer a draft
            store.review_label(engine, label_id=draft.id, status="rejected", reviewer="rev")
    for mode in ("unlabeled", "review"):
        for order in ("draft_lowest", "draft_highest"):
            user = f"{mode}-{order}"
            want = _expected(engine, mode=mode, order=order, user=user, alive=alive)
            assert len(want) >= 10
            assert _queue(engine, mode=mode, order=order, user=user) == want, (mode, order)


def test_summary_counts_and_series(engine) -> None:
    write_records(engine, synthetic_run(d_sae=16, n_dead=0))
    a = _draft(engine, 1, [0.75, 0.5])
    _draft(engine, 2, [0.25, None])
    _draft(engine, 2, [1.0], explainer="local")
    c = _draft(engine, 3, [0.5, 0.5])
    store.review_label(engine, label_id=a.id, status="accepted", reviewer="rev")
    store.review_label(engine, label_id=c.id, status="rejected", reviewer="rev")
    person = store.create_label(engine, sae_id=SAE_ID, index=4, author="ann",
                                edit=LabelEdit(description="digits"))
    store.save_scores(engine, label_id=person.id, expected_version=1,
                      scores=[_score("detection", 0.875, scorer="local:m", control=None)])
    with read_session(engine) as session:
        summary = store.autointerp_summary(session=session, sae_id=SAE_ID)
    # Shown: the accepted draft (1) and the person's label (4); drafts wait on 2 only.
    assert (summary.labeled, summary.drafted, summary.accepted) == (2, 1, 1)
    counts = {e.explainer: (e.total, e.draft, e.accepted, e.rejected)
              for e in summary.explainers}
    assert counts == {"local": (1, 1, 0, 0), "pattern": (3, 1, 1, 1)}
    series = {(s.source, s.method, s.scorer): (sorted(s.scores), sorted(s.controls))
              for s in summary.series}
    assert series == {
        ("local", "detection", "keyword"): ([1.0], [0.5]),
        ("pattern", "detection", "keyword"): ([0.25, 0.5, 0.75], [0.5, 0.5, 0.5]),
        ("pattern", "fuzzing", "keyword"): ([0.5, 0.5], [0.5, 0.5, 0.5]),
        ("people", "detection", "local:m"): ([0.875], []),
    }
