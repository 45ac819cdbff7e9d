"""`saescope user ...` and `saescope labels export|import`; serve refuses unsafe auth settings as
one line and exit 2."""

from __future__ import annotations

from typer.testing import CliRunner

from app.cli import app
from app.store.db import make_engine, read_session, upgrade
from app.store.users import hash_secret, list_users, user_by_token
from tests.factories import write_label


def test_user_commands(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    runner = CliRunner()
    added = runner.invoke(app, ["user", "add", "ann", "--role", "reviewer", "--db", url])
    assert added.exit_code == 0, added.output
    token = added.output.strip().splitlines()[-1]
    engine = make_engine(url)
    with read_session(engine) as session:
        user = user_by_token(session, token)
        assert (user.name, user.role) == ("ann", "reviewer")
        assert token not in repr(list_users(session))  # only the hash is kept
    again = runner.invoke(app, ["user", "add", "ann", "--db", url])
    assert again.exit_code == 2 and "exists" in again.output
    bad_role = runner.invoke(app, ["user", "add", "bob", "--role", "boss", "--db", url])
    assert bad_role.exit_code == 2 and "role" in bad_role.output
    assert "ann" in runner.invoke(app, ["user", "list", "--db", url]).output
    new = runner.invoke(app, ["user", "token", "ann", "--db", url]).output.strip().splitlines()[-1]
    assert new != token and hash_secret(new) != hash_secret(token)
    assert runner.invoke(app, ["user", "disable", "ann", "--db", url]).exit_code == 0
    with read_session(engine) as session:
        assert user_by_token(session, new) is None
    engine.dispose()


def test_labels_export_import(tmp_path) -> None:
    src, dst = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    upgrade(src)
    engine = make_engine(src)
    write_label(engine, sae_id="s", index=2, description="commas, \"quotes\"", tags=["x"])
    engine.dispose()
    runner = CliRunner()
    out = tmp_path / "labels.csv"
    assert runner.invoke(app, ["labels", "export", str(out), "--format", "csv", "--db", src]
                         ).exit_code == 0
    done = runner.invoke(app, ["labels", "import", str(out), "--db", dst])
    assert done.exit_code == 0 and "imported 1" in done.output
    again = runner.invoke(app, ["labels", "import", str(out), "--db", dst])
    assert again.exit_code == 2 and again.output.startswith("error: line 2:")
    shaped = runner.invoke(app, ["labels", "export", "--format", "neuronpedia", "--db", dst])
    assert '"description": "commas, \\"quotes\\""' in shaped.output


def test_serve_refuses_open_non_loopback_and_unkeyed_token(tmp_path, monkeypatch) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    runner = CliRunner()
    monkeypatch.setenv("SAESCOPE_AUTH", "none")
    from app.settings import get_settings

    get_settings.cache_clear()
    try:
        r = runner.invoke(app, ["serve", "--db", url, "--host", "0.0.0.0", "--no-model"])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
        assert "SAESCOPE_AUTH=none" in r.output
        monkeypatch.setenv("SAESCOPE_AUTH", "token")
        monkeypatch.setenv("SAESCOPE_SECRET_KEY", "change-me")
        get_settings.cache_clear()
        r = runner.invoke(app, ["serve", "--db", url, "--no-model"])
        assert r.exit_code == 2 and "SAESCOPE_SECRET_KEY" in r.output
    finally:
        get_settings.cache_clear()


def test_bad_auth_setting_and_unsafe_demo_are_one_line(tmp_path, monkeypatch) -> None:
    """A mistyped SAESCOPE_AUTH is one line naming the variable; `demo` that would serve on a
    non-loopback address without sign-in refuses before it trains or builds anything."""
    from app.settings import get_settings

    runner = CliRunner()
    monkeypatch.setenv("SAESCOPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SAESCOPE_SAES_DIR", str(tmp_path / "saes"))
    try:
        monkeypatch.setenv("SAESCOPE_AUTH", "tokens")
        get_settings.cache_clear()
        r = runner.invoke(app, ["serve", "--no-model"])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
        assert r.output.startswith("error: SAESCOPE_AUTH='tokens'")
        monkeypatch.setenv("SAESCOPE_AUTH", "none")
        monkeypatch.setenv("SAESCOPE_HOST", "0.0.0.0")
        get_settings.cache_clear()
        r = runner.invoke(app, ["demo"])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert "SAESCOPE_AUTH=none" in r.output
        assert not (tmp_path / "saes").exists() and not (tmp_path / "home").exists()
    finally:
        get_settings.cache_clear()


def test_export_to_a_folder_that_does_not_exist_is_one_line(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    r = CliRunner().invoke(app, ["labels", "export", str(tmp_path / "no" / "x.jsonl"),
                                 "--db", url])
    assert r.exit_code == 2 and r.output.startswith("error: cannot write")
    assert len(r.output.strip().splitlines()) == 1
