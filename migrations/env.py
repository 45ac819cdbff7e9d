"""Alembic environment: migrates the store's schema on SQLite (batch mode) and PostgreSQL."""

from __future__ import annotations

from alembic import context

from app.store.db import include_object, make_engine
from app.store.tables import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                # Batch migrations copy a table and drop the old one; with foreign keys enforced
                # that drop would cascade into child rows. The pragma only works outside a
                # transaction, hence before configure/begin.
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            _run(conn)
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
    finally:
        engine.dispose()


def _run(connection) -> None:  # noqa: ANN001 - alembic hands a Connection
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()
    if connection.in_transaction():
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
