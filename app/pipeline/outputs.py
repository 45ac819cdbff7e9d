"""Checks a long job runs before any model loads: its outputs can be written, its corpus has text.

Each check leaves nothing behind: a folder that does not exist yet is probed in its nearest
existing parent (a temporary file, removed at once), and a SQLite file is opened, never created.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from app.errors import ConfigError

_SQLITE_HEADER = b"SQLite format 3\x00"


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_writable_dir(path: Path, *, what: str, hint: str = "") -> None:
    """ConfigError unless files can be created in ``path`` (or in the folders that would be made
    for it): a temporary file is made and removed at once in its nearest existing folder.
    ``what`` names the output in the message (e.g. "the SAE to out/x"), ``hint`` what to do
    instead. The one writability check of every long job (build, train-sae)."""
    path = Path(path).expanduser()
    base = _nearest_existing(path)
    suffix = f"; {hint}" if hint else ""
    if not base.is_dir():
        raise ConfigError(f"cannot write {what}: {base} is not a folder{suffix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".saescope-probe-", dir=base)
    except OSError as exc:
        raise ConfigError(f"cannot write {what}: {base} is not writable "
                          f"({_reason(exc)}){suffix}") from None
    os.close(fd)
    os.unlink(probe)


def check_database(db_url: str) -> None:
    """ConfigError unless the run can be written to ``db_url``: a SQLite file (or the folder it
    would be created in) writable and holding a database, or a server that answers."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from app.store.db import display_url, make_engine

    shown = display_url(db_url)
    try:
        parsed = make_url(db_url)
    except ArgumentError:
        make_engine(db_url)  # raises its own one-line ConfigError for a malformed URL
        raise
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if not database or database == ":memory:":
            raise ConfigError(f"the database {shown} keeps nothing; pass --db with a file")
        path = Path(database).expanduser()
        hint = "check --db"
        if path.exists():
            if not path.is_file():
                raise ConfigError(f"cannot write the database {shown}: {path} is not a file; "
                                  f"{hint}")
            try:
                with path.open("r+b") as fh:
                    head = fh.read(len(_SQLITE_HEADER))
            except OSError as exc:
                raise ConfigError(f"cannot write the database {shown}: {_reason(exc)}; "
                                  f"{hint}") from None
            if head and head != _SQLITE_HEADER:
                raise ConfigError(f"{path} is not a SQLite database; {hint}")
        # SQLite writes its journal beside the file, so the folder must take new files too.
        check_writable_dir(path.parent, what=f"the database {shown}", hint=hint)
        return
    engine = make_engine(db_url)
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        reason = first[0] if first else type(exc).__name__
        raise ConfigError(f"cannot open the database {shown}: {reason}; check --db") from None
    finally:
        engine.dispose()


def check_corpus(source: str, *, text_field: str) -> None:
    """ConfigError (or OfflineError) unless the corpus exists and holds at least one document."""
    from app.pipeline.corpus import load_documents

    docs = load_documents(source, text_field=text_field)
    try:
        first = next(iter(docs), None)
    finally:
        close = getattr(docs, "close", None)
        if close is not None:
            close()
    if first is None:
        raise ConfigError(f"corpus {source!r} is empty: no document holds any text")
