"""Store test fixtures: a migrated SQLite file, and the same on a throwaway PostgreSQL cluster."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from itertools import count

import pytest
from sqlalchemy import Engine

from app.store.db import make_engine, upgrade
from tests.live_server import free_port

_db_numbers = count()


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL cluster on a loopback port for this test session; yields its base URL."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    prefix: list[str] = []
    workdir = tempfile.mkdtemp(prefix="saescope-pg-")
    if os.geteuid() == 0:
        # initdb refuses to run as root; run the cluster as the postgres system user.
        runuser = shutil.which("runuser")
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to own a test cluster")
        if not runuser:
            pytest.skip("running as root without runuser to drop to the postgres user")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
        prefix = [runuser, "-u", "postgres", "--"]
    data = os.path.join(workdir, "data")
    port = free_port()
    subprocess.run([*prefix, initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True)
    log = os.path.join(workdir, "log")
    opts = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -F"
    subprocess.run([*prefix, pg_ctl, "-D", data, "-o", opts, "-l", log, "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", data, "-m", "immediate", "stop"],
                       capture_output=True)
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
