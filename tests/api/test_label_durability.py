"""A label write that got a 2xx is there after `kill -9` of the server and a restart; and on
PostgreSQL the search query can use the full-text GIN index (same expression as the migration)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
from sqlalchemy import text

from app.store.db import make_engine, read_session
from app.store.labels import own_label, search_labels
from tests.factories import synthetic_database, synthetic_run
from tests.live_server import free_port
from tests.store.conftest import _new_pg_database, pg_server  # noqa: F401 - fixture

CLI = [sys.executable, "-c", "from app.cli import app; app()"]
SAE_ID = "1-res-topk-64"



def _serve(url: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    server = subprocess.Popen([*CLI, "serve", "--db", url, "--port", str(port), "--no-model"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/v1/saes", timeout=2)
            return server
        except httpx.TransportError:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)


def test_acknowledged_label_survives_kill_9(tmp_path):
    url = f"sqlite:///{tmp_path / 'durable.db'}"
    synthetic_database(url, synthetic_run(d_sae=16))
    env = {**os.environ, "SAESCOPE_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    port = free_port()
    server = _serve(url, port, env)
    try:
        r = httpx.put(f"http://127.0.0.1:{port}/api/v1/saes/{SAE_ID}/features/3/label",
                      json={"description": "kept"}, headers={"If-None-Match": "*"})
        assert r.status_code == 201
    finally:
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    server = _serve(url, port, env)
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/api/v1/saes/{SAE_ID}/features/3/label")
        assert (r.status_code, r.json()["description"]) == (200, "kept")
    finally:
        server.terminate()
        server.wait(timeout=30)
    engine = make_engine(url)
    with read_session(engine) as session:
        assert own_label(session=session, sae_id=SAE_ID, index=3, author="local") is not None
    engine.dispose()


def test_postgres_search_can_use_the_gin_index(pg_server):  # noqa: F811 - the fixture
    from app.store.db import upgrade
    from app.store.labels.search import PG_SEARCH_VECTOR

    url = _new_pg_database(pg_server)
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute(text(
            f"EXPLAIN SELECT id FROM labels WHERE {PG_SEARCH_VECTOR} @@ "
            "to_tsquery('simple'::regconfig, 'bracket:*')")))
    assert "ix_labels_search" in plan, plan
    with read_session(engine) as session:
        assert search_labels(session=session, q="anything") == []
    engine.dispose()
