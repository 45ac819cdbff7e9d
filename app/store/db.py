"""Database engines, connection pragmas, sessions and schema upgrades (Alembic) for the store."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import ConfigError
from app.resources import MIGRATIONS_DIR

log = logging.getLogger(__name__)

# Readers wait this long for a writer (a precompute swap holds the write lock for seconds).
SQLITE_BUSY_TIMEOUT_MS = 30_000

# Execution option naming a durable write: SQLite runs it with synchronous=FULL (labels, human
# data); bulk precompute writes keep synchronous=NORMAL, which in WAL mode can lose only the last
# transactions on power loss, never corrupt the file.
DURABLE = "saescope_durable"
# Execution option asking SQLite to take the write lock at BEGIN (BEGIN IMMEDIATE): a deferred
# transaction that read first and writes later fails at once with "database is locked" when another
# writer committed meanwhile, instead of waiting on the busy timeout.
WRITE = "saescope_write"
SQLITE_MMAP_BYTES = 1 << 30  # address space, not memory: pages load on first touch
SQLITE_CACHE_KIB = 32 * 1024
# A pooled server connection idle at least this long is pinged before it is handed out (see
# _install_idle_ping); one back in use sooner goes out as it is.
IDLE_PING_S = 5.0


_URL_EXAMPLES = "use e.g. sqlite:///data/saescope.db or postgresql+psycopg://user:pass@host/db"


def display_url(url: str) -> str:
    """`url` with its password masked: the form every message and log line shows."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url` with the store's pragmas (SQLite) or pool settings (PostgreSQL)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"not a database URL: {display_url(url)!r}; {_URL_EXAMPLES}") from None
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # psycopg 3 is the driver we depend on; plain postgresql:// would ask for psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() != "sqlite":
        try:
            engine = create_engine(parsed, **kwargs)
        except NoSuchModuleError:
            raise ConfigError(f"unknown database backend {parsed.drivername!r} in "
                              f"{display_url(url)}; {_URL_EXAMPLES}") from None
        except ModuleNotFoundError as exc:
            extra = " (pip install 'saescope[postgres]')" if parsed.get_backend_name() == \
                "postgresql" else ""
            raise ConfigError(f"the driver for {display_url(url)} is not installed: "
                              f"no module {exc.name!r}{extra}") from None
        if not kwargs.get("pool_pre_ping"):
            _install_idle_ping(engine)
        return engine

    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    connect_args = kwargs.pop("connect_args", {})
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
    connect_args.setdefault("check_same_thread", False)
    engine = create_engine(parsed, connect_args=connect_args, **kwargs)
    _install_sqlite_events(engine)
    return engine


def _install_idle_ping(engine: Engine) -> None:
    """Ping a pooled connection before use only when it sat idle IDLE_PING_S or longer.

    pool_pre_ping pings on every checkout: one more round trip to the server per request, on a
    feature read that makes five (bench/serve.py). A connection used a moment ago was alive a
    moment ago; the ones a server restart or an idle timeout leaves dead are those that sat in
    the pool. A failed ping makes the pool drop the connection and hand out a fresh one, as
    pool_pre_ping does (a server that goes away mid-burst fails that request either way).
    """
    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        # record.info belongs to this DBAPI connection: a fresh one has no entry, no ping.
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < IDLE_PING_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(f"idle connection failed its ping: {exc}") from exc


def _install_sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling never emits BEGIN before a SELECT, so two reads in a
        # session could see two different snapshots across a precompute swap. We take control and
        # emit BEGIN ourselves (SQLAlchemy's documented recipe for pysqlite).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        # Reads map the file instead of copying pages through read() calls, and keep a larger
        # page cache: a feature page touches pages all over a database of 100+ MB.
        cursor.execute(f"PRAGMA mmap_size={SQLITE_MMAP_BYTES}")
        cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        # SQLite refuses to change the safety level inside a transaction, so set it per transaction
        # right before BEGIN.
        level = "FULL" if options.get(DURABLE) else "NORMAL"
        conn.exec_driver_sql(f"PRAGMA synchronous={level}")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get(WRITE) else "BEGIN")


def is_sqlite(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "sqlite"


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    """A session whose reads all see one snapshot, so a page never mixes two precompute runs.

    SQLite: our BEGIN (see _on_begin) pins a WAL snapshot at the first read. PostgreSQL's default
    READ COMMITTED gives each statement its own snapshot, so reads run at REPEATABLE READ (a
    read-only transaction there never fails with a serialization error).
    """
    conn = engine.connect()
    if not is_sqlite(engine):
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
    try:
        with Session(bind=conn, expire_on_commit=False) as session:
            yield session
    finally:
        conn.close()


@contextmanager
def write_session(engine: Engine, *, durable: bool = False) -> Iterator[Session]:
    """A session in one write transaction, committed on success and rolled back on error.

    `durable=True` is for human data (labels): on SQLite the commit is fsynced (synchronous=FULL).
    """
    conn = engine.connect().execution_options(**{WRITE: True, DURABLE: durable})
    try:
        with Session(bind=conn, expire_on_commit=False) as session, session.begin():
            yield session
    finally:
        conn.close()


def include_object(obj: Any, name: str | None, type_: str, reflected: bool,
                   compare_to: Any) -> bool:
    """Alembic's filter for comparing the schema with the ORM: leave out what the ORM cannot
    declare, SQLite's FTS5 table (and its shadow tables) and PostgreSQL's full-text expression
    index, both made by revision 0002."""
    return not (name or "").startswith(("labels_fts", "ix_labels_search"))


def alembic_config(url: str) -> Any:
    """Alembic's Config for `url`, built in code so no alembic.ini lookup depends on the cwd."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser treats % as interpolation; URLs may hold %-escaped passwords.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, *, revision: str = "head") -> None:
    """Bring the schema at `url` to `revision` (the app and the CLI call this on start)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
