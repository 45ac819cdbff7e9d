"""The CLI shell: help lists every command; demo skips a build the database already holds."""

from __future__ import annotations

from typer.testing import CliRunner

from app.cli import _has_run, app
from app.store.db import make_engine, upgrade
from app.store.synthetic import synthetic_run
from app.store.writer import write_run


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
    engine = make_engine(url)
    try:
        write_run(engine_or_session=engine, model=rec.model, sae=rec.sae, run=rec.run,
                  sequences=rec.sequences, features=rec.features, windows=rec.windows)
    finally:
        engine.dispose()
    assert _has_run(url, sae_id="1-res-topk-64", n_tokens=rec.run.n_tokens)
    assert not _has_run(url, sae_id="1-res-topk-64", n_tokens=rec.run.n_tokens + 1)
    assert not _has_run(url, sae_id="other-sae", n_tokens=rec.run.n_tokens)
