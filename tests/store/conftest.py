"""Store test fixtures: a migrated SQLite file, and the same on a throwaway PostgreSQL cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest
from sqlalchemy import Engine

from app.store.db import make_engine, upgrade
from tests.pg_cluster import ClusterUnavailable, start_cluster

_db_numbers = count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL cluster on a loopback port for this test session; yields its base URL."""
    workdir = Path(tempfile.mkdtemp(prefix="saescope-pg-"))
    try:
        base, stop = start_cluster(workdir, fsync=False)
    except ClusterUnavailable as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.skip(str(exc))
    try:
        yield base
    finally:
        subprocess.run(stop, capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _new_pg_database(base_url: str) -> str:
    import psycopg

    name = f"t{os.getpid()}_{next(_db_numbers)}_{int(time.time() * 1000) % 100000}"
    dsn = base_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{base_url}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A freshly migrated database URL: a SQLite file, then a new PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = _new_pg_database(request.getfixturevalue("pg_server"))
    upgrade(url)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()
