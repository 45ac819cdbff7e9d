"""PostgreSQL pool: a connection that sat idle is pinged (and replaced when dead) before use; one
back in use sooner goes out without the extra round trip."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from app.store import db
from app.store.db import make_engine, read_session
from tests.store.conftest import _new_pg_database


def _backend_pid(engine) -> int:
    with read_session(engine) as session:
        return session.execute(text("SELECT pg_backend_pid()")).scalar()


def _terminate(url: str, pid: int) -> None:
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_an_idle_dead_connection_is_replaced(pg_server, monkeypatch) -> None:
    url = _new_pg_database(pg_server)
    monkeypatch.setattr(db, "IDLE_PING_S", 0.0)  # every pooled connection counts as idle
    engine = make_engine(url)
    try:
        pid = _backend_pid(engine)
        _terminate(url, pid)  # as a server restart or an idle timeout would
        assert _backend_pid(engine) != pid  # the ping found it dead; a fresh one served
    finally:
        engine.dispose()


def test_a_connection_just_used_is_not_pinged(pg_server, monkeypatch) -> None:
    url = _new_pg_database(pg_server)
    monkeypatch.setattr(db, "IDLE_PING_S", 3600.0)
    engine = make_engine(url)
    try:
        pid = _backend_pid(engine)
        _terminate(url, pid)
        # No ping: the dead connection is used, fails, and the pool drops it...
        with pytest.raises(OperationalError):
            _backend_pid(engine)
        # ...so the next read gets a fresh one.
        assert _backend_pid(engine) != pid
    finally:
        engine.dispose()
