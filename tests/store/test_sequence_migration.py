"""Revision 0004 gives every stored sequence its documents: a run written before it reads as one
document per sequence (its doc_index, at offset 0), on SQLite and PostgreSQL; a downgrade drops
the column again."""

from __future__ import annotations

import struct

import pytest
from alembic import command
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from app.store import queries
from app.store.db import alembic_config, current_revision, make_engine, upgrade
from app.store.tables import Sequence
from tests.factories import synthetic_run, write_records
from tests.store.conftest import _new_pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    return _new_pg_database(request.getfixturevalue("pg_server"))


def test_a_run_written_at_0003_reads_as_one_document_per_sequence(url):
    # A run as revision 0003 held it: written at head, then the schema taken back to 0003, which
    # keeps every row but the documents each sequence holds.
    upgrade(url)
    rec = synthetic_run(d_sae=8, n_dead=1, seed=2)
    engine = make_engine(url)
    try:
        write_records(engine, rec)
        command.downgrade(alembic_config(url), "0003")
        assert current_revision(engine) == "0003"
        columns = {c["name"] for c in inspect(engine).get_columns("sequences")}
        assert "doc_starts" not in columns and "doc_index" in columns
        with engine.connect() as conn:
            before = dict(conn.execute(text("SELECT seq_index, doc_index FROM sequences")).all())
        assert len(before) == len(rec.sequences.seq_index)

        upgrade(url, revision="0004")
        assert current_revision(engine) == "0004"
        with Session(engine) as session:
            rows = session.execute(select(Sequence.seq_index, Sequence.doc_index,
                                          Sequence.doc_starts)).all()
            assert {r.seq_index: r.doc_index for r in rows} == before
            for r in rows:
                assert r.doc_starts == struct.pack("<ii", 0, r.doc_index)
            # The explorer shows each window in its sequence's one document.
            queries.runs._RUN_CACHE.clear()
            names = rec.sequences.doc_names
            seen = 0
            for index in range(1, 8):
                got = queries.get_feature(session=session, sae_id=rec.sae.sae_id, index=index)
                for w in got.windows:
                    doc = before[w.seq_index]
                    assert [(d.offset, d.doc_index, d.name) for d in w.documents] == [
                        (0, doc, names[doc])]
                    assert w.doc_name == names[doc]
                    seen += 1
            assert seen > 0
    finally:
        engine.dispose()
