"""Revision 0002 keeps today's labels: one label per feature becomes that author's label, and
label_history becomes revisions with before/after, on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select, text

from app.store.db import make_engine, upgrade
from app.store.tables import Label, LabelRevision, LabelTag
from tests.store.conftest import _new_pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def old_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A database at revision 0001 (today's schema)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        url = _new_pg_database(request.getfixturevalue("pg_server"))
    upgrade(url, revision="0001")
    return url


def _insert_old(url: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        for version, desc, status in [(1, "opening brackets", "draft"),
                                      (2, "opening brackets ( [ {", "reviewed")]:
            conn.execute(text(
                "INSERT INTO label_history (sae_id, feature_index, version, description, tags, "
                "status, author, created_at) VALUES ('s', 3, :v, :d, :t, :st, 'ann', "
                ":at)"), {"v": version, "d": desc, "t": json.dumps(["syntax"]), "st": status,
                          "at": f"2026-01-0{version} 10:00:00"})
        conn.execute(text(
            "INSERT INTO labels (sae_id, feature_index, description, tags, status, author, "
            "version, updated_at) VALUES ('s', 3, 'opening brackets ( [ {', :t, 'reviewed', "
            "'ann', 2, '2026-01-02 10:00:00'), ('s', 5, 'no author', '[]', 'draft', '', 1, "
            "'2026-01-03 10:00:00')"), {"t": json.dumps(["syntax", "code"])})
    engine.dispose()


def test_upgrade_keeps_labels_and_history(old_url):
    _insert_old(old_url)
    upgrade(old_url)
    engine = make_engine(old_url)
    with engine.connect() as conn:
        labels = {r.feature_index: r for r in conn.execute(select(Label.__table__))}
        assert labels[3].description == "opening brackets ( [ {"
        assert (labels[3].author, labels[3].author_kind) == ("ann", "person")
        assert (labels[3].status, labels[3].version) == ("accepted", 2)
        assert labels[3].tags == ["syntax", "code"]
        assert (labels[5].author, labels[5].status) == ("legacy", "draft")
        tags = set(conn.execute(select(LabelTag.label_id, LabelTag.tag)))
        assert tags == {(labels[3].id, "syntax"), (labels[3].id, "code")}
        revs = conn.execute(select(LabelRevision.__table__)
                            .order_by(LabelRevision.version)).all()
        assert [(r.label_id, r.version, r.action) for r in revs] == [
            (labels[3].id, 1, "create"), (labels[3].id, 2, "edit")]
        assert revs[0].before is None and revs[1].before["description"] == "opening brackets"
        assert revs[1].after["status"] == "accepted"
    engine.dispose()


def test_migrated_labels_are_searchable_and_new_ids_follow(old_url):
    from app.store import labels as store
    from app.store.db import read_session

    _insert_old(old_url)
    upgrade(old_url)
    engine = make_engine(old_url)
    with read_session(engine) as session:
        hits = store.search_labels(session=session, q="brackets")
        assert [h.label.feature_index for h in hits] == [3]
        old_ids = {lb.id for lb in store.feature_labels(session=session, sae_id="s", index=3)}
    new = store.create_label(engine, sae_id="s", index=3, author="bob",
                             edit=store.LabelEdit(description="new"))
    assert new.id not in old_ids and new.id > max(old_ids)
    engine.dispose()
