"""PostgreSQL bulk writes go through COPY (psycopg 3) and store exactly the rows SQLite stores."""

from __future__ import annotations

import psycopg
from sqlalchemy import select

from app.store.db import make_engine, upgrade
from app.store.tables import Feature, FeatureToken, Sequence, Window
from app.store.writer import write_run
from tests.factories import synthetic_run
from tests.store.conftest import _new_pg_database

BULK = (Sequence, Feature, FeatureToken, Window)


def _table_rows(engine, table) -> list[tuple]:  # noqa: ANN001
    cols = list(table.__table__.columns)
    with engine.connect() as conn:
        rows = conn.execute(select(*cols).order_by(*table.__table__.primary_key.columns)).all()
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows]


def test_copy_writes_the_rows_sqlite_inserts(tmp_path, pg_server, monkeypatch) -> None:
    rec = synthetic_run(d_sae=40, n_dead=3, seed=5)
    copies: list[str] = []
    copy = psycopg.Cursor.copy

    def spy(self, statement, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        copies.append(str(statement))
        return copy(self, statement, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "copy", spy)
    engines = {}
    for name, url in (("sqlite", f"sqlite:///{tmp_path / 'a.db'}"),
                      ("postgresql", _new_pg_database(pg_server))):
        upgrade(url)
        engines[name] = make_engine(url)
        write_run(engine_or_session=engines[name], **rec.as_kwargs())
    try:
        for table in BULK:
            assert any(f"COPY {table.__tablename__} " in c for c in copies), copies
            lite, pg = _table_rows(engines["sqlite"], table), _table_rows(engines["postgresql"],
                                                                           table)
            assert len(lite) == len(pg) > 0, table.__tablename__
            for a, b in zip(lite, pg, strict=True):
                assert a == b, \
                    (table.__tablename__, a, b)
    finally:
        for eng in engines.values():
            eng.dispose()
