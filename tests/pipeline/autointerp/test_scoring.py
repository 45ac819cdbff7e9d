"""Detection and fuzzing on planted features: exact for a scorer that answers from the true
activations, chance for one that answers at random, every unreadable reply counted wrong; the
windows at zero are zero, the fuzzing marks are right or wrong as stated, and a fixed seed draws
the same windows."""

from __future__ import annotations

import numpy as np
import pytest

from app.pipeline.autointerp.pattern import explain_pattern
from app.pipeline.autointerp.scorer_prompts import parse_numbers
from app.pipeline.autointerp.scoring import (
    ScoringOptions,
    detection_items,
    fuzzing_items,
    score_explanation,
    strongest_positions,
)
from app.store import queries
from app.store.db import make_engine, read_session
from tests.factories import planted_values
from tests.pipeline.autointerp.scripted import (
    PLANTS,
    SAE_ID,
    KeywordScorer,
    OracleScorer,
    RandomScorer,
    planted_database,
)

BIG = ScoringOptions(n_activating=120, n_zero=120, n_fuzz=240)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A planted database with hundreds of stored windows per feature (random scoring over
    at least 200 windows)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('big') / 'big.db'}"
    run, pool = planted_database(url, n_seq=400, context_size=48, occurrences=900, n_top=100,
                                 per_band=100)
    engine = make_engine(url)
    with read_session(engine) as session:
        features = {p.index: queries.get_feature(session=session, sae_id=SAE_ID, index=p.index)
                    for p in PLANTS}
    yield features, pool, run
    engine.dispose()


@pytest.mark.parametrize("method", ["detection", "fuzzing"])
def test_a_scorer_answering_from_the_true_activations_scores_one(big, method) -> None:
    features, pool, _ = big
    for index, feature in features.items():
        oracle = OracleScorer(index)
        score = score_explanation(feature, "anything", method=method, scorer=oracle, seed=0,
                                  control=("something else", "test"), negatives=pool,
                                  options=BIG)
        assert score.score == 1.0, (index, score.details)
        assert score.control_score == 1.0  # the oracle ignores explanations
        assert score.details["unparsed_batches"] == 0
        assert score.n_windows == score.details["n_true"] + score.details["n_false"]
        assert min(score.details["n_true"], score.details["n_false"]) >= 20
        assert (score.method, score.scorer, score.seed) == (method, "oracle", 0)


@pytest.mark.parametrize("method", ["detection", "fuzzing"])
def test_a_scorer_answering_at_random_scores_chance(big, method) -> None:
    features, pool, _ = big
    score = score_explanation(features[3], "anything", method=method, scorer=RandomScorer(1),
                              seed=0, control=("other", "test"), negatives=pool, options=BIG)
    assert score.n_windows >= 200, score.details
    assert abs(score.score - 0.5) <= 0.1, score.details
    assert abs(score.control_score - 0.5) <= 0.1, score.details


def test_unreadable_replies_count_as_wrong_and_are_reported(planted) -> None:
    engine, _, pool = planted
    with read_session(engine) as session:
        feature = queries.get_feature(session=session, sae_id=SAE_ID, index=3)
    junk = RandomScorer(0, junk_every=1)  # every reply is prose
    score = score_explanation(feature, "x", method="detection", scorer=junk, seed=0,
                              negatives=pool)
    details = score.details
    assert score.score == 0.0
    assert details["unparsed_batches"] == details["batches"] > 0
    assert details["bad_answers"][0] == "I think the feature is about values."
    assert details["tp"] == details["tn"] == 0


def test_the_pattern_explanation_predicts_and_the_control_does_not(big) -> None:
    features, pool, _ = big
    feature = features[5]
    control = (explain_pattern(features[7]), "pattern explanation of feature 7")
    score = score_explanation(feature, explain_pattern(feature), method="detection",
                              scorer=KeywordScorer(), seed=0, control=control,
                              negatives=pool, options=BIG)
    assert score.score == 1.0
    assert score.control_score <= 0.6
    assert score.details["control"]["source"] == "pattern explanation of feature 7"


def test_windows_at_zero_are_zero_and_outside_the_recorded_windows(big) -> None:
    features, pool, run = big
    feature = features[3]
    rng = np.random.default_rng(0)
    items, why = detection_items(feature, negatives=pool, rng=rng, options=BIG)
    assert why is None
    rows = {int(s): r for r, s in enumerate(run.sequences.seq_index)}
    truth = planted_values(PLANTS, run.sequences.tokens)[3]
    recorded = [(w.seq_index, w.start, w.start + len(w.token_ids)) for w in feature.windows]
    zero = [i.excerpt for i in items if not i.truth]
    assert len(zero) == BIG.n_zero
    for e in zero:
        s, a, b = e.span
        assert not truth[rows[s], a:b].any()
        assert list(e.token_ids) == run.sequences.tokens[rows[s], a:b].tolist()
        assert not any(s == rs and a < rb and ra < b for rs, ra, rb in recorded)
    for i in items:
        if i.truth:
            assert i.excerpt.max_value > 0
    spans = [e.span for e in zero]
    assert len(set(spans)) == len(spans)
    # Lengths follow the activating windows', so length tells the scorer nothing.
    assert {len(e.token_ids) for e in zero} <= {len(i.excerpt.token_ids) for i in items if i.truth}


def test_fuzzing_marks_are_right_or_as_many_other_tokens(big) -> None:
    features, _, _ = big
    items, why = fuzzing_items(features[5], rng=np.random.default_rng(0), options=BIG)
    assert why is None
    n_right = sum(i.truth for i in items)
    assert abs(n_right - (len(items) - n_right)) <= 1
    for item in items:
        right = strongest_positions(item.excerpt.values, BIG.fuzz_fraction)
        assert len(item.marks) == len(right) > 0
        assert (list(item.marks) == right) == item.truth
        text = item.text()
        assert text.count("<<") == len(right)


def test_a_fixed_seed_draws_the_same_windows(big) -> None:
    features, pool, _ = big
    def spans(seed):
        items, _ = detection_items(features[7], negatives=pool,
                                   rng=np.random.default_rng([seed, 7, 0]), options=BIG)
        return [(i.excerpt.span, i.truth) for i in items]
    assert spans(0) == spans(0)
    assert spans(0) != spans(1)
    first = score_explanation(features[7], "x", method="fuzzing", scorer=RandomScorer(5),
                              seed=3, negatives=pool)
    again = score_explanation(features[7], "x", method="fuzzing", scorer=RandomScorer(5),
                              seed=3, negatives=pool)
    assert (first.score, first.details) == (again.score, again.details)


@pytest.mark.parametrize(("answer", "expected"), [
    ("[1, 3]", ({1, 3}, 0)),
    ("Answer: [2]\n", ({2}, 0)),
    ('```json\n["1", "4"]\n```', ({1, 4}, 0)),
    ("<think>maybe [9]</think> [] ", (set(), 0)),
    ("none", (set(), 0)),
    ("[1, 12, 0]", ({1}, 2)),
    ("first [5] then [2, 3]", ({2, 3}, 0)),
    ("the first and third", None),
    ("[1, two]", None),
    ("", None),
    ("[1, 3", ({1, 3}, 0)),  # stopped at the list's end, which the reply leaves out
    ("[", (set(), 0)),
    ("[2] and then [4", ({4}, 0)),
])
def test_parse_numbers(answer, expected) -> None:
    assert parse_numbers(answer, 10) == expected
