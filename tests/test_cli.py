"""The CLI shell: help lists every command; demo skips a build the database already holds."""

from __future__ import annotations

from typer.testing import CliRunner

from app.cli import _has_run, app
from app.store.db import upgrade
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
