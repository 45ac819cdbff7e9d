"""The CLI shell: help lists every command; demo skips a build the database already holds; a bad
database URL is one line with the password masked."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from app.cli import _has_run, app
from app.store.db import display_url, upgrade
from tests.factories import synthetic_database, synthetic_run


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("models", "train-sae", "build", "demo", "serve", "db"):
        assert command in result.output


def test_has_run_matches_sae_and_token_count(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    # No database file yet: nothing to skip.
    assert not _has_run(url, sae_id="1-res-topk-64", n_tokens=1)
    upgrade(url)
    assert not _has_run(url, sae_id="1-res-topk-64", n_tokens=1)  # schema, but no such SAE
    rec = synthetic_run(sae_id="1-res-topk-64")
    synthetic_database(url, rec, migrate=False)
    assert _has_run(url, sae_id="1-res-topk-64", n_tokens=rec.run.n_tokens)
    assert not _has_run(url, sae_id="1-res-topk-64", n_tokens=rec.run.n_tokens + 1)
    assert not _has_run(url, sae_id="other-sae", n_tokens=rec.run.n_tokens)


BAD_URLS = [
    ("nosuch://x", "unknown database backend 'nosuch'"),
    ("mysql://reader:hunter2@db.example/x", "the driver for mysql://reader:***@db.example/x"),
    # A refused connection (port 1 on loopback): the message names the URL, password masked.
    ("postgresql://reader:hunter2@127.0.0.1:1/x",
     "cannot open the database postgresql://reader:***@127.0.0.1:1/x"),
]


@pytest.mark.parametrize(("url", "message"), BAD_URLS)
@pytest.mark.parametrize("command", [["db", "upgrade"], ["serve", "--no-model"]])
def test_a_bad_database_url_is_one_line_and_exit_2(tmp_path, monkeypatch, command, url,
                                                   message) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*command, "--db", url])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "hunter2" not in result.output
    assert not list(tmp_path.iterdir())  # nothing written


def test_display_url_masks_passwords() -> None:
    assert display_url("postgresql+psycopg://u:p%40ss@h:5432/db") == \
        "postgresql+psycopg://u:***@h:5432/db"
    assert display_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert "secret" not in display_url("not a url://u:secret@host")
