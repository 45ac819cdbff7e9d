"""Tokenized corpora cached by fingerprint: a rebuild reuses them (one line) with identical
tokens, and a changed corpus is tokenized again."""

from __future__ import annotations

import numpy as np
import pytest

import app.pipeline.token_cache as token_cache
from app.engine.tiny import build_tiny
from app.pipeline.build_inputs import tokenize
from app.pipeline.precompute import BuildOptions

CTX = 16


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = ["def", "add", "(", "a", ",", "b", ")", ":", "return", "the", "fox", "class"]
    for i in range(5):
        (folder / f"d{i}.txt").write_text(" ".join(rng.choice(words, 150)))
    return folder


def test_second_build_reuses_the_tokenized_corpus_with_identical_tokens(tmp_path, corpus,
                                                                        monkeypatch) -> None:
    lm = build_tiny("tiny-llama")
    opts = BuildOptions(sae_path=tmp_path, db_url="sqlite://", cache_dir=tmp_path / "cache",
                        corpus=str(corpus), n_tokens=6 * CTX, eval_tokens=2 * CTX)
    first_log: list[str] = []
    first = tokenize(lm, opts, CTX, log=first_log.append)
    assert not any("reusing" in line for line in first_log)

    def no_parsing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the corpus was parsed again")

    monkeypatch.setattr(token_cache, "load_documents", no_parsing)
    monkeypatch.setattr(token_cache, "tokenize_corpus", no_parsing)
    second_log: list[str] = []
    second = tokenize(lm, opts, CTX, log=second_log.append)
    assert [line for line in second_log if "reusing" in line] == second_log
    assert len(second_log) == 1 and "tokenized corpus" in second_log[0]
    a, b = first.corpus, second.corpus
    for name in ("tokens", "doc_index", "special_mask", "doc_ids"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert getattr(a, name).dtype == getattr(b, name).dtype, name
    assert a.doc_names == b.doc_names and a.n_real_tokens == b.n_real_tokens
    assert np.array_equal(first.eval_tokens, second.eval_tokens)
    assert np.array_equal(first.eval_special, second.eval_special)
    assert first.eval_after == second.eval_after

    # A changed document changes the fingerprint: parsed and tokenized again.
    monkeypatch.undo()
    (corpus / "d0.txt").write_text("return the fox " * 40)
    third_log: list[str] = []
    third = tokenize(lm, opts, CTX, log=third_log.append)
    assert not third_log and not np.array_equal(third.corpus.tokens, a.tokens)
