"""The per-person generation limit under auth=token: a slot (store/generation_slots.py) taken
before a generation is admitted, freed when it ends, fails, is stopped or its client leaves.

The slots are database rows, so the limit holds across `saescope serve --workers N` processes;
a crashed process's slots expire after the generation time limit plus a margin. Without sign-in
(auth=none, one local admin) there is no slot: the model queue alone bounds generations.
"""

from __future__ import annotations

import logging

import anyio
from fastapi import Request
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from app.api.auth import Principal
from app.errors import TooManyRequestsError
from app.settings import Settings
from app.store.generation_slots import GenerationSlot, release_slot, take_slot

log = logging.getLogger(__name__)

# A slot outlives its generation's time limit by this much, so it never expires while the
# generation still steps; a crashed process's slot is free again after both.
SLOT_MARGIN_S = 30
RETRY_AFTER_S = 5


class HeldSlot:
    """A taken slot (or none, under auth=none); ``release()`` frees it once, even when the task
    that holds it is being cancelled (a client that left)."""

    def __init__(self, engine: Engine | None = None, slot: GenerationSlot | None = None) -> None:
        self._engine = engine
        self._slot = slot

    async def release(self) -> None:
        slot, self._slot = self._slot, None
        if slot is None or self._engine is None:
            return
        # Shielded: this runs in the `finally` of a cancelled stream, where any other await
        # would be cancelled before the row is deleted.
        with anyio.CancelScope(shield=True):
            try:
                await run_in_threadpool(release_slot, self._engine, slot)
            except Exception:  # noqa: BLE001 - the slot expires on its own; keep the response
                log.exception("freeing a generation slot failed; it expires at %s",
                              slot.expires_at)


async def take_generation_slot(request: Request, user: Principal) -> HeldSlot:
    """One of ``user``'s generation slots, or TooManyRequestsError (429 + Retry-After) when
    they all run."""
    settings: Settings = request.app.state.settings
    if settings.auth == "none" or user.user_id is None:
        return HeldSlot()
    engine: Engine = request.app.state.db_engine
    limit = settings.steer_per_user
    slot = await run_in_threadpool(
        take_slot, engine, user_id=user.user_id, limit=limit,
        ttl_seconds=settings.steer_time_limit_s + SLOT_MARGIN_S)
    if slot is None:
        running = "1 generation" if limit == 1 else f"{limit} generations"
        raise TooManyRequestsError(
            f"{user.name} already runs {running}, the most one person may run at once "
            f"(SAESCOPE_STEER_PER_USER); stop one or wait for it to end, then retry",
            retry_after=RETRY_AFTER_S)
    return HeldSlot(engine, slot)
