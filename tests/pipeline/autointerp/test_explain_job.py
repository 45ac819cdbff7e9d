"""The explain job in process: drafts with scores, a rerun that skips finished features (and asks
no scorer), an interrupted run resumed, people's labels and reviewed drafts left alone; and
score_label on a person's label."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.errors import ConfigError, Interrupted, NotFoundError
from app.pipeline.autointerp.explain_job import (
    ExplainJob,
    FeatureSelection,
    parse_features,
    parse_methods,
    run_explain,
)
from app.pipeline.autointerp.label_scoring import score_label
from app.pipeline.autointerp.pattern import explain_pattern
from app.store import labels as store
from app.store.db import make_engine, read_session
from app.store.tables import LabelExplanation
from tests.pipeline.autointerp.scripted import SAE_ID, KeywordScorer, planted_database


class Counting(KeywordScorer):
    """The keyword scorer, counting calls; raises KeyboardInterrupt at call `stop_at`."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls = 0
        self.stop_at = stop_at

    def complete(self, messages, options):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return super().complete(messages, options)


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'job.db'}"
    _, pool = planted_database(url)
    engine = make_engine(url)
    yield engine, pool
    engine.dispose()


def _run(engine, pool, scorer, *, features="all", seed=0, pools=None, explain=explain_pattern,
         **kw):
    job = ExplainJob(sae_id=SAE_ID, selection=parse_features(features), seed=seed,
                     progress=False, **kw)
    made = pools if pools is not None else []
    return run_explain(engine, job, explain=explain, scorer=scorer,
                       negatives=lambda: made.append(1) or pool, log=lambda _m: None)


def _drafts(engine):
    with read_session(engine) as session:
        labels = store.labels_of(session=session, sae_id=SAE_ID, indices=list(range(16)))
        drafts = {i: lb for i, ls in labels.items() for lb in ls
                  if lb.author == "autointerp:pattern"}
        scores = store.scores_of(session=session, label_ids=[d.id for d in drafts.values()])
        made = dict(session.execute(select(LabelExplanation.label_id,
                                           LabelExplanation.created_at)).all())
    return drafts, scores, made


def test_explains_scores_and_a_rerun_skips_everything(db) -> None:
    engine, pool = db
    scorer = Counting()
    summary = _run(engine, pool, scorer, features="3,5,7")
    assert (summary.asked, summary.explained) == (3, 3)
    drafts, scores, _ = _drafts(engine)
    assert sorted(drafts) == [3, 5, 7]
    for index, draft in drafts.items():
        assert (draft.author_kind, draft.status) == ("automatic", "draft")
        assert draft.description == explain_pattern_of(engine, index)
        by_method = {s.method: s for s in scores[draft.id]}
        assert set(by_method) == {"detection", "fuzzing"}
        assert by_method["detection"].score == 1.0  # the keyword scorer trusts the tokens
        assert by_method["detection"].control_score is not None
        assert by_method["detection"].details["control"]["source"].startswith(
            "pattern explanation of feature ")
    calls, pools = scorer.calls, []
    again = _run(engine, pool, scorer, features="3,5,7", pools=pools)
    assert (again.finished_before, again.explained, scorer.calls, pools) == (3, 0, calls, [])
    other_seed = _run(engine, pool, scorer, features="3", seed=1)
    assert other_seed.explained == 1 and _drafts(engine)[0][3].version == 1  # same text


def explain_pattern_of(engine, index):
    from app.store import queries

    with read_session(engine) as session:
        return explain_pattern(queries.get_feature(session=session, sae_id=SAE_ID, index=index))


def test_an_interrupted_run_resumes_without_redoing_finished_features(db) -> None:
    engine, pool = db
    calls = []

    def explain_then_stop(feature):  # Ctrl-C while the 4th feature is being explained
        calls.append(feature.index)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return explain_pattern(feature)

    with pytest.raises(Interrupted, match="after 3 features"):
        _run(engine, pool, Counting(), explain=explain_then_stop)
    # Scoring stopped inside a feature too: nothing half-written.
    with pytest.raises(Interrupted, match="after 0 features"):
        _run(engine, pool, Counting(stop_at=3), features="9")
    first, _, made = _drafts(engine)
    assert sorted(first) == [1, 2, 3]
    summary = _run(engine, pool, Counting())
    assert (summary.finished_before, summary.explained) == (3, 12)
    drafts, scores, made_after = _drafts(engine)
    assert sorted(drafts) == list(range(1, 16))
    for index in (1, 2, 3):  # not redone: same version, same explanation record
        assert drafts[index].version == 1
        assert made_after[drafts[index].id] == made[first[index].id]
    assert all(len(scores[d.id]) == 2 for d in drafts.values())


def test_people_and_reviewers_come_first(db) -> None:
    engine, pool = db
    person = store.create_label(engine, sae_id=SAE_ID, index=5, author="ann",
                                edit=store.LabelEdit(description="errors"))
    _run(engine, pool, Counting(), features="3,5", methods=())
    unlabeled = _run(engine, pool, Counting(), features="unlabeled", methods=(), seed=1)
    assert unlabeled.asked == 14  # every live feature but 5
    drafts, _, _ = _drafts(engine)
    with read_session(engine) as session:
        assert store.shown_labels(session=session, sae_id=SAE_ID, indices=[5])[5].id == person.id
    store.review_label(engine, label_id=drafts[3].id, status="accepted", reviewer="rev")
    rerun = _run(engine, pool, Counting(), features="3,5", seed=2)
    assert (rerun.reviewed, rerun.explained) == (1, 1)
    assert _drafts(engine)[0][3].status == "accepted"


def test_score_label_scores_a_persons_label(db) -> None:
    engine, pool = db
    good = store.create_label(engine, sae_id=SAE_ID, index=5, author="ann",
                              edit=store.LabelEdit(description="fires on ' error', ' count'"))
    scores = score_label(engine, label_id=good.id, scorer=KeywordScorer(), negatives=pool)
    assert [s.method for s in scores] == ["detection", "fuzzing"]
    assert scores[0].score == 1.0
    with read_session(engine) as session:
        stored = store.scores_of(session=session, label_ids=[good.id])[good.id]
    assert {(s.method, s.label_version, s.scorer) for s in stored} == {
        ("detection", 1, "keyword"), ("fuzzing", 1, "keyword")}
    fuzz_only = score_label(engine, label_id=good.id, scorer=KeywordScorer(),
                            methods=("fuzzing",), seed=4)
    assert fuzz_only[0].seed == 4
    with pytest.raises(ConfigError, match="zero"):
        score_label(engine, label_id=good.id, scorer=KeywordScorer())
    with pytest.raises(NotFoundError):
        score_label(engine, label_id=999, scorer=KeywordScorer(), negatives=pool)


def test_parse_features_and_methods() -> None:
    assert parse_features("all") == FeatureSelection(None)
    assert parse_features(" Unlabeled ") == FeatureSelection(None, unlabeled=True)
    assert parse_features("0-3, 9,2") == FeatureSelection([0, 1, 2, 3, 9])
    for bad in ("", "1-", "3-1", "a", "1;2", "-1", "0-99999999"):
        with pytest.raises(ConfigError, match="--features"):
            parse_features(bad)
    assert parse_methods("fuzzing,detection") == ["detection", "fuzzing"]
    assert parse_methods("none") == []
    for bad in ("", "vibes", "none,detection"):
        with pytest.raises(ConfigError, match="--score"):
            parse_methods(bad)
