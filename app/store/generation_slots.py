"""Generation slots: a signed-in person runs at most N generations at once, in every server process.

A slot is a row of the leases table (``label_leases``, see tables.LabelLease), so every worker
process of `saescope serve --workers N` sees it: ``sae_id`` is ``generation/{user id}`` (a "/"
never appears in an SAE id, which is one URL path segment), ``feature_index`` the slot number
(0..N-1, the primary key: two processes cannot take one slot), ``user_name`` the slot's own random
holder id (a release removes only the lease it took) and ``expires_at`` when a crashed process's
slot frees itself. A generation's slot lives at most its time limit plus a margin, so it is
never taken while its generation still runs, and never needs renewing.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from app.store.db import read_session, write_session
from app.store.tables import LabelLease, utcnow

KEY_PREFIX = "generation/"


@dataclass(frozen=True)
class GenerationSlot:
    """One slot taken: which person's, which number, whose, and until when at the latest."""

    key: str
    index: int
    holder: str
    expires_at: datetime


def slot_key(user_id: int) -> str:
    return f"{KEY_PREFIX}{user_id}"


def take_slot(engine: Engine, *, user_id: int, limit: int, ttl_seconds: float,
              now: datetime | None = None) -> GenerationSlot | None:
    """A free slot of this person's ``limit``, held for at most ``ttl_seconds``; None when all
    are taken. One write transaction: clear the person's expired slots, then take the first
    free number (the primary key decides between processes racing for it)."""
    now = now or utcnow()
    key = slot_key(user_id)
    expires = now + timedelta(seconds=ttl_seconds)
    holder = secrets.token_hex(16)
    with write_session(engine) as session:
        session.execute(delete(LabelLease).where(LabelLease.sae_id == key,
                                                 LabelLease.expires_at < now))
        insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" \
            else sqlite.insert
        for index in range(limit):
            # ON CONFLICT DO NOTHING: a taken number is skipped, not an aborted transaction.
            taken = session.execute(insert(LabelLease).values(
                sae_id=key, feature_index=index, user_name=holder, expires_at=expires,
            ).on_conflict_do_nothing().returning(LabelLease.feature_index)).first()
            if taken is not None:
                return GenerationSlot(key=key, index=index, holder=holder, expires_at=expires)
    return None


def release_slot(engine: Engine, slot: GenerationSlot) -> None:
    """Free the slot (a no-op when it already expired and was taken by another generation)."""
    with write_session(engine) as session:
        session.execute(delete(LabelLease).where(and_(
            LabelLease.sae_id == slot.key, LabelLease.feature_index == slot.index,
            LabelLease.user_name == slot.holder)))


def held_slots(engine: Engine, *, user_id: int, now: datetime | None = None) -> int:
    """How many of this person's slots are taken and not expired."""
    now = now or utcnow()
    with read_session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(LabelLease).where(
            LabelLease.sae_id == slot_key(user_id), LabelLease.expires_at >= now)) or 0)
