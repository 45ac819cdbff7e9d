"""Feature table queries against brute-force answers computed from the records."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy.orm import Session

from app.errors import ConfigError, NotFoundError
from app.records import WINDOW_KIND_TOP
from app.store import queries
from app.store.writer import write_run
from tests.factories import synthetic_run, write_records

SAE_ID = "1-res-topk-64"


@pytest.fixture
def loaded(engine):
    vocab = [f"t{i}" for i in range(60)]
    vocab[7] = " the"
    vocab[8] = "the"
    rec = synthetic_run(d_sae=40, n_dead=4, seed=11, token_strings=vocab, n_seq=30)
    # Ties in max_act so the index tie-break is exercised.
    rec.features.max_act[10] = rec.features.max_act[20] = rec.features.max_act[30]
    write_records(engine, rec, labels=[
        {"sae_id": SAE_ID, "index": 5, "description": "Python keywords",
         "tags": ["code", "syntax"]},
        {"sae_id": SAE_ID, "index": 9, "description": "the word 'the'", "tags": ["english"]},
        # An emptied label does not count as labeled.
        {"sae_id": SAE_ID, "index": 12, "description": "", "tags": ["code_like"]},
    ])
    return rec


def _all(session, **kw) -> list[int]:
    page = queries.list_features(session=session, sae_id=SAE_ID, per_page=500, **kw)
    assert page.total == len(page.items)
    return [row.index for row in page.items]


def test_sorting_matches_numpy(engine, loaded):
    f = loaded.features
    idx = np.arange(40)
    with Session(engine) as session:
        assert _all(session) == idx.tolist()
        assert _all(session, sort="index", order="desc") == idx[::-1].tolist()
        by_max = sorted(idx.tolist(), key=lambda i: (-float(np.float32(f.max_act[i])), i))
        assert _all(session, sort="max_act", order="desc") == by_max
        by_density = sorted(idx.tolist(), key=lambda i: (float(f.frac_nonzero[i]), i))
        assert _all(session, sort="frac_nonzero") == by_density
        mean = np.where(f.count > 0, f.act_sum / np.maximum(f.count, 1), 0.0)
        assert _all(session, sort="mean_act", order="desc") == sorted(
            idx.tolist(), key=lambda i: (-mean[i], i)
        )


def test_filters(engine, loaded):
    f = loaded.features
    with Session(engine) as session:
        assert _all(session, filter="dead") == [0, 1, 2, 3]
        assert _all(session, filter="alive") == list(range(4, 40))
        assert _all(session, filter="dense") == np.flatnonzero(f.frac_nonzero > 0.1).tolist()
        assert _all(session, filter="labeled") == [5, 9]
        assert _all(session, filter="unlabeled") == [i for i in range(40) if i not in (5, 9)]
        assert _all(session, tag="code") == [5]  # whole tags only: not "code_like"
        assert _all(session, tag="code_like") == [12]
        assert _all(session, tag=" Code ") == [5]  # as tags are stored: lowercase, trimmed
        assert _all(session, q="PYTHON") == [5]
        assert _all(session, q="%") == []
        assert _all(session, q="'the'", filter="labeled") == [9]
        with pytest.raises(ConfigError, match="filter"):
            _all(session, filter="bogus")
        with pytest.raises(ConfigError, match="sort"):
            _all(session, sort="label")


def test_token_search_matches_brute_force(engine, loaded):
    w, s = loaded.windows, loaded.sequences

    def brute(ids: set[int]) -> list[int]:
        hits = set()
        for i in np.flatnonzero(w.kind == WINDOW_KIND_TOP):
            row = int(np.flatnonzero(s.seq_index == w.seq_index[i])[0])
            if int(s.tokens[row, w.start[i] + w.max_pos[i]]) in ids:
                hits.add(int(w.feature[i]))
        return sorted(hits)

    with Session(engine) as session:
        assert _all(session, token="the") == brute({7, 8})  # " the" and "the"
        assert _all(session, token="8") == brute({8})
        assert _all(session, token="t33") == brute({33})
        assert _all(session, token="no-such-token") == []
        page = queries.list_features(session=session, sae_id=SAE_ID, page=1, per_page=40)
        for row in page.items:
            assert len(row.top_tokens) <= queries.TOP_TOKENS_PER_FEATURE
            if row.index < 4:
                assert row.top_tokens == []


def test_pagination(engine, loaded):
    with Session(engine) as session:
        seen = []
        for page_no in range(1, 6):
            page = queries.list_features(session=session, sae_id=SAE_ID, sort="max_act",
                                         order="desc", page=page_no, per_page=9)
            assert page.total == 40
            seen += [r.index for r in page.items]
        assert seen == _all(session, sort="max_act", order="desc")
        with pytest.raises(ConfigError):
            queries.list_features(session=session, sae_id=SAE_ID, per_page=0)


def test_unknown_sae_and_index(engine, loaded):
    with Session(engine) as session:
        with pytest.raises(NotFoundError, match="no SAE"):
            queries.get_feature(session=session, sae_id="nope", index=0)
        with pytest.raises(NotFoundError, match="features 0..39"):
            queries.get_feature(session=session, sae_id=SAE_ID, index=40)
        with pytest.raises(NotFoundError):
            queries.list_features(session=session, sae_id="nope")


def test_sae_overview_and_random(engine, loaded):
    with Session(engine) as session:
        info = queries.get_sae(session=session, sae_id=SAE_ID)
        assert info.n_labeled == 2
        assert info.run is not None
        assert info.run.sae_stats["n_dead"] == 4
        for _ in range(20):
            assert 4 <= queries.random_feature(session=session, sae_id=SAE_ID) < 40
        models = queries.list_models(session=session)
        assert [(m.id, m.sae_ids) for m in models] == [("tiny-llama", [SAE_ID])]


def test_two_databases_with_the_same_run_id_do_not_share_cached_runs(tmp_path):
    from app.store.db import make_engine, upgrade

    engines = []
    for name in ("a", "b"):
        url = f"sqlite:///{tmp_path / f'{name}.db'}"
        upgrade(url)
        engine = make_engine(url)
        rec = synthetic_run(d_sae=8, corpus=f"corpus {name}", seed=ord(name))
        assert write_run(engine_or_session=engine, **rec.as_kwargs()) == 1
        engines.append(engine)
    for _ in range(2):
        for engine, name in zip(engines, "ab", strict=True):
            with Session(engine) as session:
                got = queries.get_feature(session=session, sae_id=SAE_ID, index=5)
                assert got.corpus == f"corpus {name}"
    for engine in engines:
        engine.dispose()
