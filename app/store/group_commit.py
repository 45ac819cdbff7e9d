"""Group commit for durable writes on SQLite: writes from threads that arrive together share one
transaction and one fsync, each in its own savepoint.

Why: with synchronous=FULL every SQLite commit waits for an fsync (about 7 ms on the disk this
was measured on), and SQLite lets one writer in at a time, the others sleeping in its busy
handler in steps of 1, 2, 5, 10... ms. Eight threads each committing their own label edit got
about 50 writes/s that way (bench/labels.py). Here the first thread to arrive leads: it takes
every write queued so far, runs each in a SAVEPOINT of one durable transaction (a write that
raises rolls back alone, and its error goes to its own caller), commits once and wakes the
callers; writes that arrive meanwhile queue for the next leader. A caller returns only after the
commit that holds its write, so an answer still means the write is on disk.

PostgreSQL runs each write in its own transaction: its server already flushes the WAL of
concurrent commits together.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.store.db import is_sqlite, write_session

T = TypeVar("T")


class _Ticket:
    __slots__ = ("done", "error", "job", "result")

    def __init__(self, job: Callable[[Session], Any]) -> None:
        self.job = job
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False


class GroupCommit:
    """One engine's queue of durable writes; one leader at a time commits what is queued."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._pending: list[_Ticket] = []
        self._leading = False

    def run(self, job: Callable[[Session], T]) -> T:
        ticket = _Ticket(job)
        with self._cond:
            self._pending.append(ticket)
            # Wait while another thread leads: it may commit this write too (then done).
            while self._leading and not ticket.done:
                self._cond.wait()
            lead = not ticket.done
            if lead:
                self._leading = True
                batch, self._pending = self._pending, []
        if lead:
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def _commit(self, batch: list[_Ticket]) -> None:
        try:
            with write_session(self._engine, durable=True) as session:
                for ticket in batch:
                    try:
                        with session.begin_nested():
                            ticket.result = ticket.job(session)
                    except Exception as exc:  # noqa: BLE001 - handed to the write's own caller
                        ticket.error = exc
        except BaseException as exc:
            # Nothing of the batch was committed: every write fails, with the commit's error.
            for ticket in batch:
                if ticket.error is None:
                    ticket.error, ticket.result = exc, None
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._cond:
                for ticket in batch:
                    ticket.done = True


_groups: weakref.WeakKeyDictionary[Engine, GroupCommit] = weakref.WeakKeyDictionary()
_groups_lock = threading.Lock()


def durable_write(engine: Engine, job: Callable[[Session], T]) -> T:
    """`job(session)` in a durable write transaction; returns once that transaction committed.
    On SQLite, concurrent calls share the transaction (each job in its own savepoint)."""
    if not is_sqlite(engine):
        with write_session(engine, durable=True) as session:
            return job(session)
    with _groups_lock:
        group = _groups.get(engine)
        if group is None:
            group = _groups[engine] = GroupCommit(engine)
    return group.run(job)
