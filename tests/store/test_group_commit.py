"""Group commit (store/group_commit.py): label writes that arrive together share one durable
transaction, each in its own savepoint; one failing write fails alone; nobody is answered before
the commit that holds their write; and every label write runs with synchronous=FULL."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import event, insert, select

from app.errors import PreconditionFailedError
from app.store import labels as store
from app.store.db import make_engine, read_session, upgrade
from app.store.group_commit import GroupCommit
from app.store.tables import Label, utcnow


@pytest.fixture
def sqlite_engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'g.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _label_row(index: int) -> dict:
    now = utcnow()
    return {"sae_id": "s", "feature_index": index, "author": "ann", "author_kind": "person",
            "description": f"label {index}", "tags": [], "status": "draft", "notes": "",
            "version": 1, "created_at": now, "updated_at": now}


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def test_writes_queued_behind_a_leader_commit_together(sqlite_engine):
    group = GroupCommit(sqlite_engine)
    commits: list[int] = []
    event.listen(sqlite_engine, "commit", lambda conn: commits.append(1))
    release = threading.Event()
    results: dict[int, object] = {}

    def blocking_job(session):
        release.wait(30)  # holds the lead while the others queue
        session.execute(insert(Label).values(**_label_row(0)))
        return 0

    def job_for(index: int):
        def job(session):
            session.execute(insert(Label).values(**_label_row(index)))
            return index
        return job

    def call(key: int, job) -> None:
        try:
            results[key] = group.run(job)
        except Exception as exc:  # noqa: BLE001 - checked below
            results[key] = exc

    first = threading.Thread(target=call, args=(0, blocking_job))
    first.start()
    _wait_until(lambda: group._leading, "the first write leads")
    # Four writes queue behind it; the third inserts a duplicate of the first (unique
    # (sae_id, feature_index, author_kind, author)) and must fail alone.
    others = [threading.Thread(target=call, args=(k, job_for(0 if k == 3 else k)))
              for k in (1, 2, 3, 4)]
    for t in others:
        t.start()
    _wait_until(lambda: len(group._pending) == 4, "four writes queued")
    assert results == {}  # nobody answered before a commit
    release.set()
    for t in (first, *others):
        t.join(30)
    assert results[0] == 0 and results[1] == 1 and results[2] == 2 and results[4] == 4
    assert type(results[3]).__name__ == "IntegrityError"
    assert len(commits) == 2  # the leader's own, then one for the four queued writes
    with read_session(sqlite_engine) as session:
        assert sorted(session.scalars(select(Label.feature_index))) == [0, 1, 2, 4]


def test_a_failed_commit_fails_every_write_of_its_batch(sqlite_engine):
    group = GroupCommit(sqlite_engine)

    def fail_commit(conn):
        raise RuntimeError("disk full")

    event.listen(sqlite_engine, "commit", fail_commit)
    with pytest.raises(RuntimeError, match="disk full"):
        group.run(lambda session: session.execute(insert(Label).values(**_label_row(5))))
    event.remove(sqlite_engine, "commit", fail_commit)
    with read_session(sqlite_engine) as session:
        assert session.scalars(select(Label.id)).all() == []


def test_every_label_write_runs_with_synchronous_full(sqlite_engine):
    """A process kill cannot tell FULL from OFF: read the pragma on the connection that writes
    each revision, through the store's own create, edit, review, withdraw and import."""
    seen: list[tuple[str, int]] = []

    @event.listens_for(sqlite_engine, "before_cursor_execute")
    def _pragma(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO label_revisions"):
            level = conn.connection.dbapi_connection.execute("PRAGMA synchronous").fetchone()[0]
            seen.append((statement.split()[2], level))

    made = store.create_label(sqlite_engine, sae_id="s", index=1, author="ann",
                              edit=store.LabelEdit(description="one"))
    edited = store.update_label(sqlite_engine, label_id=made.id, expected_version=1,
                                edit=store.LabelEdit(description="two"), actor="ann")
    reviewed = store.review_label(sqlite_engine, label_id=made.id, status="accepted",
                                  reviewer="rev", expected_version=edited.version)
    with pytest.raises(PreconditionFailedError):
        store.update_label(sqlite_engine, label_id=made.id, expected_version=1,
                           edit=store.LabelEdit(description="stale"), actor="ann")
    store.withdraw_label(sqlite_engine, label_id=made.id, expected_version=reviewed.version,
                         actor="ann")
    store.import_records(sqlite_engine, [(1, {"sae_id": "s", "feature_index": 2,
                                              "author": "bob", "description": "imported"})])
    assert [level for _, level in seen] == [2] * 5  # 2 = FULL; the stale edit wrote none
