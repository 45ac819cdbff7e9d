"""The first Alembic revision creates exactly the schema the ORM declares; SQLite pragmas hold."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from app.store.db import current_revision, include_object, make_engine, upgrade
from app.store.tables import Base


def test_migrated_schema_matches_models(engine, db_url):
    assert current_revision(engine) is not None
    with engine.connect() as conn:
        diffs = compare_metadata(
            MigrationContext.configure(
                conn, opts={"compare_type": True, "include_object": include_object}),
            Base.metadata,
        )
    assert diffs == []
    upgrade(db_url)  # a second upgrade is a no-op, not an error


def test_sqlite_pragmas(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    engine.dispose()


def test_migration_history_is_one_line() -> None:
    """Every new revision rebases on the current head: two heads would make `db upgrade` refuse
    to choose, and would mean two features' schema changes were never applied together."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from app.resources import MIGRATIONS_DIR

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    script = ScriptDirectory.from_config(config)
    heads = script.get_heads()
    assert len(heads) == 1, (
        f"the migration history has {len(heads)} heads {heads}; set the new revision's "
        "down_revision to the current head (`alembic heads`)"
    )
    # One line from base to head: no branch points either.
    for rev in script.walk_revisions():
        assert len(rev.nextrev) <= 1, f"revision {rev.revision} has several children"
