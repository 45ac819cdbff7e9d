"""`saescope explain`: bad input is one line and exit 2; SIGKILL during a run, then the same
command resumes without redoing the features it finished."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import app
from app.pipeline.autointerp import backends
from tests.factories import synthetic_database, synthetic_run

REPO = Path(__file__).resolve().parents[1]
SAE_ID = "1-res-topk-64"


@pytest.fixture
def db_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'explain.db'}"
    synthetic_database(url, synthetic_run(d_sae=64, n_dead=3))
    return url


@pytest.mark.parametrize(("args", "message"), [
    (["--sae", "nope"], "error: no SAE 'nope' in this database"),
    (["--features", "1-x"], "error: --features '1-x': use all, unlabeled, or indices"),
    (["--features", "64"], "error: SAE '1-res-topk-64' has features 0..63; there is no "
                           "feature 64"),
    (["--score", "vibes"], "error: --score 'vibes': use detection, fuzzing"),
    (["--explainer", "gpt"], "error: --explainer 'gpt': use one of pattern, local, openai"),
])
def test_bad_input_is_one_line_and_exit_2(db_url, args, message) -> None:
    result = CliRunner().invoke(app, ["explain", "--sae", SAE_ID, "--db", db_url, *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(message), result.output
    assert result.output.count("\n") == 1


def test_a_backend_missing_from_this_build_is_one_line(db_url, monkeypatch) -> None:
    monkeypatch.setitem(backends.BACKENDS, "local",
                        ("app.pipeline.autointerp.no_such_backend", "LocalBackend"))
    for args in (["--score", "fuzzing"], ["--explainer", "local", "--score", "none"]):
        result = CliRunner().invoke(app, ["explain", "--sae", SAE_ID, "--db", db_url, *args])
        assert result.exit_code == 2, result.output
        assert result.output == ("error: the 'local' chat backend is not in this build of "
                                 "saescope (app.pipeline.autointerp.no_such_backend is "
                                 "missing)\n")


def _drafts(db: Path) -> dict[int, tuple]:
    con = sqlite3.connect(db)
    try:
        return {row[0]: row[1:] for row in con.execute(
            "SELECT l.feature_index, l.version, e.created_at FROM labels l "
            "JOIN label_explanations e ON e.label_id = l.id "
            "WHERE l.author = 'autointerp:pattern'")}
    finally:
        con.close()


def test_sigkill_then_rerun_resumes(tmp_path) -> None:
    db = tmp_path / "kill.db"
    synthetic_database(f"sqlite:///{db}", synthetic_run(d_sae=200, n_dead=3))
    cmd = [sys.executable, "-c", "from app.cli import app; app()", "explain", "--sae", SAE_ID,
           "--db", f"sqlite:///{db}", "--score", "none"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        while proc.poll() is None and len(_drafts(db)) < 20:  # poll the database
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.02)
        assert proc.poll() is None, proc.stdout.read()  # still running: kill it mid-way
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = _drafts(db)
    assert 20 <= len(before) < 197
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "197 live features selected on 1-res-topk-64 (3 never fire" in rerun.stdout
    assert f"skipping {len(before)} features already explained by autointerp:pattern with " \
           "seed 0" in rerun.stdout
    assert f"explained {197 - len(before)} features" in rerun.stdout
    after = _drafts(db)
    assert sorted(after) == list(range(3, 200))
    assert {i: after[i] for i in before} == before  # not redone: same version, same record
    assert all(version == 1 for version, _ in after.values())
