"""Windows at zero on a real build (tiny-llama, a random TopK SAE): the pool encodes the stored
sequences with the model and SAE the database names, and every window it draws is zero by an
independent dense encode of the whole sequence; the explain job scores real features with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.engine.sae import SAE
from app.engine.tiny import build_tiny
from app.errors import ConfigError
from app.pipeline.autointerp.explain_job import ExplainJob, run_explain
from app.pipeline.autointerp.negatives import pool_from_store
from app.pipeline.autointerp.pattern import explain_pattern
from app.pipeline.autointerp.windows import excerpt_of
from app.store import labels as store
from app.store import queries
from app.store.db import make_engine, read_session
from tests.factories import synthetic_database, synthetic_run, tiny_word_build
from tests.pipeline.autointerp.scripted import KeywordScorer

HOOK = "blocks.2.hook_resid_post"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", ";", "def", "add",
         "(", ",", ")", ":", "return", "+", "class", "Counter", "model", "feature", "sparse",
         "layer", "token", "print", "range", "0", "1", "2", "3", "10", "100", "python"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("negatives")
    url = tiny_word_build(root, WORDS, sae_id="tiny", hook=HOOK)
    engine = make_engine(url)
    yield engine, root
    engine.dispose()


def test_windows_at_zero_are_zero_by_a_dense_encode(built) -> None:
    engine, root = built
    pool = pool_from_store(engine, sae_id="tiny", n_sequences=1000, seed=0,
                           cache_dir=root / "cache")
    lm = build_tiny("tiny-llama")
    sae = SAE.load(root / "sae")
    with read_session(engine) as session:
        run_id = queries.sae_weights(session=session, sae_id="tiny").run_id
        features = [queries.get_feature(session=session, sae_id="tiny", index=i)
                    for i in queries.alive_features(session=session, run_id=run_id)[:12]]
        assert sorted(pool.tokens) == queries.sequence_indices(session=session, run_id=run_id)
    with torch.inference_mode():
        ids = np.stack([pool.tokens[s] for s in pool.seq_order])
        acts = lm.run_to_hook(torch.from_numpy(ids).long(), HOOK).to(torch.float16).float()
        dense = sae.encode(acts).numpy()  # [seq, pos, d_sae]
    row = {s: r for r, s in enumerate(pool.seq_order)}
    checked = 0
    for feature in features:
        recorded = [excerpt_of(w) for w in feature.windows]
        for e in recorded:  # the dense encode agrees with the build on the recorded windows
            ordinary = ~np.isin(e.token_ids, list(lm.special_token_ids))  # BOS is stored as 0
            got = dense[row[e.seq_index], e.start:e.start + len(e.values), feature.index]
            np.testing.assert_allclose(got[ordinary], e.values[ordinary], rtol=0.02, atol=0.02)
        zero = pool.zero_excerpts(feature=feature.index, lengths=[10] * 6,
                                  exclude=[e.span for e in recorded],
                                  rng=np.random.default_rng(feature.index), vocab=feature.vocab)
        for e in zero:
            s, a, b = e.span
            assert (dense[row[s], a:b, feature.index] == 0).all()
            assert not any(s == rs and a < rb and ra < b for rs, ra, rb in
                           (r.span for r in recorded))
            checked += 1
    assert checked >= 30


def test_the_job_scores_real_features_with_real_windows_at_zero(built) -> None:
    engine, root = built
    job = ExplainJob(sae_id="tiny", max_features=4, progress=False)
    summary = run_explain(
        engine, job, explain=explain_pattern, scorer=KeywordScorer(),
        negatives=lambda: pool_from_store(engine, sae_id="tiny", n_sequences=64, seed=0,
                                          cache_dir=root / "cache"), log=lambda _m: None)
    assert summary.explained == 4
    with read_session(engine) as session:
        drafts = [lb for ls in store.labels_of(session=session, sae_id="tiny",
                                               indices=list(range(48))).values() for lb in ls]
        scores = store.scores_of(session=session, label_ids=[d.id for d in drafts])
    assert len(drafts) == 4
    for draft in drafts:
        by_method = {s.method: s for s in scores[draft.id]}
        detection = by_method["detection"]
        assert detection.details["n_false"] > 0 and detection.score is not None
        assert 0.0 <= detection.score <= 1.0 and detection.control_score is not None


def test_missing_weights_are_one_clear_error(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    synthetic_database(url, synthetic_run())  # its SAE path is /nowhere/...
    engine = make_engine(url)
    try:
        with pytest.raises(ConfigError, match="are not there; detection scoring encodes"):
            pool_from_store(engine, sae_id="1-res-topk-64", n_sequences=8, seed=0,
                            cache_dir=tmp_path)
    finally:
        engine.dispose()
