"""The demo's drafts: every live feature of a real (tiny) build gets the pattern explainer's
description as an unscored draft by autointerp:pattern, and a rerun writes nothing."""

from __future__ import annotations

from sqlalchemy import select

from app.pipeline.autointerp.pattern import explain_pattern
from app.pipeline.demo_drafts import ensure_demo_drafts
from app.store import queries
from app.store.db import make_engine, read_session
from app.store.tables import Label, LabelScore
from tests.factories import tiny_word_build

WORDS = ["the", "quick", "brown", "fox", "def", "return", "(", ")", ":", "class", "model"]


def test_demo_drafts_every_live_feature_once(tmp_path) -> None:
    url = tiny_word_build(tmp_path, WORDS)
    first = ensure_demo_drafts(db_url=url, sae_id="tiny", log=lambda _m: None, progress=False)
    engine = make_engine(url)
    try:
        with read_session(engine) as session:
            run_id = queries.explain_targets(session=session, sae_id="tiny",
                                             indices=None).run_id
            alive = queries.alive_features(session=session, run_id=run_id)
            labels = session.execute(select(Label)).scalars().all()
            expected = {i: explain_pattern(queries.get_feature(session=session, sae_id="tiny",
                                                               index=i)) for i in alive}
            assert session.execute(select(LabelScore)).first() is None  # unscored
        assert alive and first.explained == len(alive)
        assert {(lb.feature_index, lb.author, lb.status) for lb in labels} == {
            (i, "autointerp:pattern", "draft") for i in alive}
        assert {lb.feature_index: lb.description for lb in labels} == expected
        again = ensure_demo_drafts(db_url=url, sae_id="tiny", log=lambda _m: None,
                                   progress=False)
        assert (again.explained, again.finished_before) == (0, len(alive))
        with read_session(engine) as session:
            assert len(session.execute(select(Label)).scalars().all()) == len(alive)
    finally:
        engine.dispose()
