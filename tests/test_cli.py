"""The CLI shell: help lists every command; demo skips a build the database already holds; a bad
database URL is one line with the password masked; an offline hub id fails at once, without a
network attempt."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from app.cli import _has_run, app
from app.engine.presets import is_installed, list_presets
from app.pipeline.corpus import PACKING
from app.store.db import display_url, upgrade
from tests.factories import synthetic_database, synthetic_run


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("models", "train-sae", "build", "demo", "serve", "db", "explain"):
        assert command in result.output


def test_has_run_matches_sae_and_token_count(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    # No database file yet: nothing to skip.
    assert not _has_run(url, sae_id="1-res-topk-64", n_tokens=1)
    upgrade(url)
    assert not _has_run(url, sae_id="1-res-topk-64", n_tokens=1)  # schema, but no such SAE
    rec = synthetic_run(sae_id="1-res-topk-64")
    rec.run.config.update(token_budget=1000, packing=PACKING)
    synthetic_database(url, rec, migrate=False)
    assert _has_run(url, sae_id="1-res-topk-64", n_tokens=1000)
    assert not _has_run(url, sae_id="1-res-topk-64", n_tokens=1001)
    assert not _has_run(url, sae_id="other-sae", n_tokens=1000)
    old = synthetic_run(sae_id="old-layout")  # built before packing: rebuilt, not skipped
    old.run.config.update(token_budget=1000)
    synthetic_database(url, old, migrate=False)
    assert not _has_run(url, sae_id="old-layout", n_tokens=1000)


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


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    """An empty data folder and an empty hub cache, so nothing local can answer for a hub id."""
    from huggingface_hub import constants

    from app.settings import get_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAESCOPE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def _tiny_sae_folder(path):
    from app.engine.sae import SAE, SAEConfig

    cfg = SAEConfig(architecture="topk", d_in=64, d_sae=16, k=2,
                    hook_name="blocks.2.hook_resid_post", model_name="tiny-llama")
    return SAE.from_config(cfg, seed=0).save(path)


@pytest.mark.parametrize("flagged", [True, False], ids=["HF_HUB_OFFLINE", "no-dns"])
@pytest.mark.parametrize("command", ["train-sae", "build"])
def test_an_offline_hub_id_is_one_line_and_exit_2_without_a_network_attempt(
        offline_home, monkeypatch, network_calls, command, flagged) -> None:
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE at import, as a real run would.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", flagged)
    args = [command, "--model", "EleutherAI/pythia-70m"]
    if command == "build":
        sae = _tiny_sae_folder(offline_home / "sae")
        args += ["--sae", str(sae), "--db", f"sqlite:///{offline_home / 'x.db'}"]
    before = sorted(p.name for p in offline_home.iterdir())
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert "'EleutherAI/pythia-70m'" in errors[0] and "offline" in errors[0]
    # Only installed presets are offered (the random tiny test models never are).
    for preset in list_presets():
        offered = preset.source != "tiny" and is_installed(preset)
        assert (f"{preset.name}," in errors[0] or f"{preset.name})" in errors[0]) == offered
    assert "Traceback" not in result.output
    if flagged:
        assert network_calls == []
    else:  # one DNS lookup of the hub host, failing at once, and no connection
        assert len(network_calls) == 1 and "'huggingface.co'" in network_calls[0], network_calls
    assert sorted(p.name for p in offline_home.iterdir()) == before  # nothing written


def test_python_dash_m_app_cli_runs_the_cli() -> None:
    """`python -m app.cli` is the CLI too (it used to import the module and exit 0 silently)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "app.cli", "user", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "People who sign in" in done.stdout
