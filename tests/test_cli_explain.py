"""`saescope explain`: bad input is one line and exit 2; SIGKILL during a run, then the same
command resumes without redoing the features it finished."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
    (["--explainer", "openai", "--prompt-style", "vibes"],
     "error: --prompt-style 'vibes': use activations or output"),
    (["--prompt-style", "output"], "error: --prompt-style 'output': the pattern explainer has "
                                   "no prompt"),
    (["--concurrency", "4"], "error: --concurrency sends requests to an openai endpoint at "
                             "once; a local model answers one at a time"),
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


class FakeEndpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint: every explainer prompt gets DESCRIPTION, every scorer
    prompt "[1]", each reply reported as 100 tokens. It records the requests' messages and how
    many were in flight at most; the first `meet` requests wait at a barrier, so they are
    answered only when that many are in flight at once (a failure answers 400)."""

    requests: list[list[dict]] = []
    in_flight = 0
    most_in_flight = 0
    meet: threading.Barrier | None = None
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        cls = type(self)
        with cls.lock:
            cls.requests.append(body["messages"])
            cls.in_flight += 1
            cls.most_in_flight = max(cls.most_in_flight, cls.in_flight)
            waits = cls.meet is not None and len(cls.requests) <= cls.meet.parties
        status = 200
        if waits:
            try:
                cls.meet.wait(timeout=60)  # a failsafe: the test fails, it does not hang
            except threading.BrokenBarrierError:
                status = 400
        explainer = "You study one feature" in body["messages"][0]["content"]
        answer = {"choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": DESCRIPTION if explainer else "[1]"}}],
            "usage": {"prompt_tokens": 90, "completion_tokens": 10, "total_tokens": 100}}
        if status != 200:
            answer = {"error": {"message": "the requests did not meet", "type": "x"}}
        data = json.dumps(answer).encode()
        with cls.lock:
            cls.in_flight -= 1
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


DESCRIPTION = "the planted tokens"


@pytest.fixture
def endpoint() -> Iterator[tuple[str, type[FakeEndpoint]]]:
    handler = type("Endpoint", (FakeEndpoint,), {"requests": [], "lock": threading.Lock()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def _explain_openai(db_url: str, url: str, *args: str):  # noqa: ANN202 - a click Result
    return CliRunner().invoke(app, ["explain", "--sae", SAE_ID, "--db", db_url, "--explainer",
                                    "openai", "--explainer-url", url, "--explainer-model", "m",
                                    "--api-key-env", "SAESCOPE_TEST_NO_KEY", *args])


def _openai_drafts(db_url: str) -> dict[int, tuple[str, dict, int]]:
    """feature -> (description, explanation details, number of scores) of autointerp:openai."""
    con = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    try:
        return {row[0]: (row[1], json.loads(row[2]), row[3]) for row in con.execute(
            "SELECT l.feature_index, l.description, e.details, "
            "(SELECT count(*) FROM label_scores s WHERE s.label_id = l.id) FROM labels l "
            "JOIN label_explanations e ON e.label_id = l.id "
            "WHERE l.author = 'autointerp:openai'")}
    finally:
        con.close()


def test_the_prompt_style_is_sent_and_recorded(db_url, endpoint) -> None:
    url, handler = endpoint
    default = _explain_openai(db_url, url, "--features", "3-4", "--score", "none")
    assert default.exit_code == 0, default.output
    output = _explain_openai(db_url, url, "--features", "5-6", "--score", "none",
                             "--prompt-style", "output")
    assert output.exit_code == 0, output.output
    asked = [m[-1]["content"] for m in handler.requests]
    assert all(a.startswith("Excerpts where the feature is most active:") for a in asked[:2])
    assert all(a.startswith("Tokens it makes more likely:") for a in asked[2:]), asked
    drafts = _openai_drafts(db_url)
    assert {i: d[1]["prompt_style"] for i, d in drafts.items()} == {
        3: "activations", 4: "activations", 5: "output", 6: "output"}
    assert {d[1]["backend"] for d in drafts.values()} == {"openai:m"}


def test_a_token_budget_stops_cleanly_and_a_rerun_goes_on(db_url, endpoint) -> None:
    url, handler = endpoint
    # 100 tokens a request, checked before each: the fourth request would start past 250.
    first = _explain_openai(db_url, url, "--features", "3-12", "--score", "none",
                            "--max-tokens", "250")
    assert first.exit_code == 0, first.output
    assert "explained 3 features\n" in first.output  # after the progress bar's last state
    stopped = [ln for ln in first.output.splitlines() if ln.startswith("stopped")]
    assert stopped == ["stopped early: the token budget is used up: 300 of 250 tokens in 3 "
                       "requests (--max-tokens); the features finished are stored: run the "
                       "same command with a larger --max-tokens to go on"]
    assert sorted(_openai_drafts(db_url)) == [3, 4, 5]
    rerun = _explain_openai(db_url, url, "--features", "3-12", "--score", "none",
                            "--max-tokens", "2000")
    assert rerun.exit_code == 0, rerun.output
    assert "skipping 3 features already explained by autointerp:openai" in rerun.output
    assert "explained 7 features" in rerun.output and "stopped early" not in rerun.output
    assert sorted(_openai_drafts(db_url)) == list(range(3, 13))
    assert len(handler.requests) == 10


def test_the_budget_counts_the_scorer_too(db_url, endpoint) -> None:
    url, handler = endpoint
    # A scorer backend of its own (another model name) counts against the same budget: the
    # explainer's request and two scorer requests use 300 of 250 tokens, and the next check
    # stops the run (with a budget each, the scorer would have sent a third).
    result = _explain_openai(db_url, url, "--features", "3-12", "--score", "fuzzing",
                             "--scorer-model", "m2", "--max-tokens", "250")
    assert result.exit_code == 0, result.output
    assert "stopped early: the token budget is used up: 300 of 250 tokens in 3 requests" in \
        result.output
    assert [r[0]["content"].startswith("You study one feature") for r in handler.requests] == [
        True, False, False]
    assert _openai_drafts(db_url) == {}  # the feature in progress is not stored


def test_concurrency_sends_features_at_once(db_url, endpoint) -> None:
    url, handler = endpoint
    handler.meet = threading.Barrier(3)
    result = _explain_openai(db_url, url, "--features", "3-11", "--score", "fuzzing",
                             "--concurrency", "3")
    assert result.exit_code == 0, result.output
    assert handler.most_in_flight == 3  # three features at a time, never more
    drafts = _openai_drafts(db_url)
    assert sorted(drafts) == list(range(3, 12))
    assert all(d[0] == DESCRIPTION and d[2] == 1 for d in drafts.values())
    assert "explained 9 features; fuzzing mean" in result.output


def test_a_budget_spent_with_features_in_flight_keeps_every_finished_one(db_url,
                                                                         endpoint) -> None:
    url, handler = endpoint
    result = _explain_openai(db_url, url, "--features", "3-12", "--score", "none",
                             "--concurrency", "2", "--max-tokens", "250")
    assert result.exit_code == 0, result.output
    assert "stopped early: the token budget is used up" in result.output
    # Each request is checked before it is sent; the features in flight when the budget ran
    # out finish: every answered feature is stored, and the run stopped short of all ten.
    drafts = _openai_drafts(db_url)
    assert len(drafts) == len(handler.requests) and 3 <= len(drafts) < 10
    assert f"explained {len(drafts)} features" in result.output
