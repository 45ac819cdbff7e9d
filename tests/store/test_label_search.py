"""Label search on SQLite and PostgreSQL past the rank window: a query matching more labels than
RANK_WINDOW ranks the newest of them and still honours the SAE and tag filters exactly."""

from __future__ import annotations

import pytest

from app.store import labels as store
from app.store.db import read_session
from app.store.labels import LabelEdit
from app.store.labels import search as search_module


@pytest.fixture
def small_window(monkeypatch) -> int:
    monkeypatch.setattr(search_module, "RANK_WINDOW", 3)
    return 3


def _label(engine, index: int, description: str, *, sae_id: str = "a", tags=(), notes=""):
    return store.create_label(engine, sae_id=sae_id, index=index, author="ann", edit=LabelEdit(
        description=description, tags=list(tags), notes=notes))


def test_rank_window_keeps_filters_exact(engine, small_window):
    # Oldest first: two labels of SAE "b", then many of SAE "a", all with the word "common".
    _label(engine, 0, "common word, old", sae_id="b", tags=["foo-bar"])
    _label(engine, 1, "common word, old too", sae_id="b")
    for i in range(2, 10):
        _label(engine, i, f"common word number {i}", tags=["foo", "bar"] if i % 2 else [])
    _label(engine, 10, "common common common", tags=["foo-bar"])
    with read_session(engine) as session:
        def found(**kw) -> list[int]:
            return [h.label.feature_index for h in store.search_labels(session=session, **kw)]

        # More matches than the window: results come from the newest three, best first.
        newest = found(q="common")
        assert set(newest) == {8, 9, 10} and newest[0] == 10
        # SAE b's two matches are older than every match of SAE a: the window is per SAE.
        assert set(found(q="common", sae_id="b")) == {0, 1}
        # Tags ["foo", "bar"] hold the words of "foo-bar" side by side: not that tag.
        assert set(found(q="common", tag="foo-bar")) == {0, 10}
        assert set(found(q="comm", tag="Foo Bar")) == {0, 10}  # stored form: foo-bar
        # The window counts only labels that pass the filters: the newest three tagged foo.
        assert set(found(q="common", tag="foo")) == {5, 7, 9}


def test_tag_filter_without_words_in_the_index(engine):
    _label(engine, 1, "under scores", tags=["a_b"])
    with read_session(engine) as session:
        assert [h.label.feature_index
                for h in store.search_labels(session=session, q="under", tag="a_b")] == [1]
        assert store.search_labels(session=session, q="under", tag="___") == []


def test_query_words_drop_syntax_and_repeats():
    from app.store.labels.search import query_words

    assert query_words('Foo "bar" foo* OR (baz) NEAR/2 bar') == ["foo", "bar", "or", "baz",
                                                                  "near", "2"]
