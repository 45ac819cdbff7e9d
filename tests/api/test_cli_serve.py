"""`saescope db upgrade` and `saescope serve` as a user runs them: real processes, real uvicorn."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from alembic.script import ScriptDirectory

from app.store.db import alembic_config
from tests.factories import synthetic_database, synthetic_run
from tests.live_server import first_answer, free_port

CLI = [sys.executable, "-c", "from app.cli import app; app()"]



@pytest.mark.parametrize("workers", [1, 2])
def test_db_upgrade_then_serve(tmp_path, workers):
    """With --workers 2 the worker processes build their app from the environment: the SAE list
    comes from the --db given on the command line, not the default database."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "SAESCOPE_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*CLI, "db", "upgrade", "--db", url], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert f"revision {head}" in done.stdout
    synthetic_database(url, synthetic_run(d_sae=16), migrate=False)  # the CLI migrated it

    port = free_port()
    server = subprocess.Popen(
        [*CLI, "serve", "--db", url, "--port", str(port), "--no-model", "--workers", str(workers)],
        env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        response = first_answer(f"http://127.0.0.1:{port}/api/v1/saes", server)
        assert response.status_code == 200
        assert [s["id"] for s in response.json()["data"]] == ["1-res-topk-64"]
        feature = httpx.get(f"http://127.0.0.1:{port}/api/v1/saes/1-res-topk-64/features/5")
        assert feature.status_code == 200 and feature.json()["index"] == 5
    finally:
        server.terminate()
        server.wait(timeout=30)
    # No worker outlives the command: the port takes no more connections.
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
        except OSError:
            break
        assert time.monotonic() < deadline, "a server process still listens after terminate"
        time.sleep(0.2)


def test_serve_workers_on_a_taken_port_is_one_line_exit_2(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*CLI, "serve", "--db", url, "--port", str(port), "--no-model", "--workers", "2"],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "SAESCOPE_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


def test_bad_database_url_is_one_line_exit_2(tmp_path):
    done = subprocess.run([*CLI, "db", "upgrade", "--db", "not a url"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "not a database URL" in done.stderr
