"""Activation cache on tiny-llama: contents equal run_to_hook, resume after an interrupt, reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.engine.tiny import build_tiny
from app.errors import ConfigError
from app.pipeline.activations import get_activations, open_cache
from app.pipeline.corpus import load_corpus

HOOK = "blocks.2.hook_resid_post"
CTX = 16
BUDGET = 40 * CTX


@pytest.fixture(scope="module")
def lm():
    return build_tiny("tiny-llama")


@pytest.fixture
def corpus_dir(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(
            f"Document {i}. The quick brown fox jumps over the lazy dog {i} times.\n" * (3 + i),
            encoding="utf-8")
    return folder


class Interrupted(Exception):
    pass


def _get(lm, corpus_dir, cache_dir, **kw):
    return get_activations(lm=lm, hook_name=HOOK, corpus=str(corpus_dir), max_tokens=BUDGET,
                           context_size=CTX, cache_dir=cache_dir, batch_size=4, chunk_seqs=8,
                           progress=False, **kw)


def test_cache_holds_the_hook_activations_of_the_corpus(lm, corpus_dir, tmp_path):
    cache = _get(lm, corpus_dir, tmp_path / "cache")
    corpus = load_corpus(str(corpus_dir), lm=lm, context_size=CTX, max_tokens=BUDGET)
    assert cache.acts.dtype == np.float16 and cache.acts.shape == (corpus.n_seq, CTX, lm.d_model)
    assert corpus.n_seq > 40 and corpus.real_tokens() <= BUDGET  # packed: the budget is text
    assert np.array_equal(cache.tokens, corpus.tokens)
    assert np.array_equal(cache.doc_index, corpus.doc_index)
    assert np.array_equal(cache.special_mask, corpus.special_mask)
    assert cache.doc_names == corpus.doc_names
    direct = lm.run_to_hook(torch.from_numpy(corpus.tokens).long(), HOOK)
    # batch composition may change float32 sums in the last bit, hence a float16-sized tolerance
    np.testing.assert_allclose(np.asarray(cache.acts, dtype=np.float32), direct.numpy(),
                               rtol=2e-3, atol=2e-3)
    assert cache.special_mask[:, 0].all()  # BOS positions are flagged

    counted = cache.counted_activations(chunk_seqs=7)
    assert np.array_equal(counted, np.asarray(cache.acts)[~np.asarray(cache.special_mask)])
    batches = list(cache.iter_batches(16))
    assert [b.start for b in batches] == [0, 16, 32]
    assert np.array_equal(np.concatenate([b.acts for b in batches]), np.asarray(cache.acts))


def test_interrupted_cache_resumes_to_identical_arrays(lm, corpus_dir, tmp_path):
    reference = _get(lm, corpus_dir, tmp_path / "a")

    def stop_after_first_chunk(done):
        raise Interrupted(done)

    with pytest.raises(Interrupted):
        _get(lm, corpus_dir, tmp_path / "b", on_chunk=stop_after_first_chunk)
    partial = next((tmp_path / "b" / "activations").iterdir())
    assert not (partial / "complete.json").exists()
    with pytest.raises(ConfigError, match="incomplete"):
        open_cache(partial)

    chunks_after_resume: list[int] = []
    resumed = _get(lm, corpus_dir, tmp_path / "b", on_chunk=chunks_after_resume.append)
    n_seq = reference.n_seq
    # The first chunk (8 sequences) was kept.
    assert chunks_after_resume == [*range(16, n_seq, 8), n_seq]
    assert resumed.key == reference.key
    for name in ("tokens", "acts", "doc_index", "special_mask"):
        assert np.array_equal(np.asarray(getattr(resumed, name)),
                              np.asarray(getattr(reference, name)))


def test_complete_cache_is_reused_and_keys_separate_inputs(lm, corpus_dir, tmp_path):
    first = _get(lm, corpus_dir, tmp_path)
    ran: list[int] = []
    again = _get(lm, corpus_dir, tmp_path, on_chunk=ran.append)
    assert ran == [] and again.path == first.path
    other_hook = get_activations(lm=lm, hook_name="blocks.1.hook_resid_post",
                                 corpus=str(corpus_dir), max_tokens=BUDGET, context_size=CTX,
                                 cache_dir=tmp_path, progress=False)
    other_budget = get_activations(lm=lm, hook_name=HOOK, corpus=str(corpus_dir),
                                   max_tokens=BUDGET - CTX, context_size=CTX,
                                   cache_dir=tmp_path, progress=False)
    assert len({first.key, other_hook.key, other_budget.key}) == 3
    n = other_budget.n_seq
    assert n < first.n_seq
    assert np.array_equal(np.asarray(other_budget.acts), np.asarray(first.acts)[:n])


def test_budget_larger_than_corpus_writes_nothing(lm, corpus_dir, tmp_path):
    with pytest.raises(ConfigError, match="lower --tokens"):
        get_activations(lm=lm, hook_name=HOOK, corpus=str(corpus_dir), max_tokens=10**6,
                        context_size=CTX, cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "activations").exists()
