"""Generation slots on SQLite and PostgreSQL: at most `limit` per person, taken once each when
processes race, freed by their own holder only, and expired when a process never frees them."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from app.errors import NotFoundError
from app.store.generation_slots import held_slots, release_slot, take_slot
from app.store.labels.queue import next_feature
from app.store.tables import utcnow


def test_a_person_takes_at_most_limit_slots_and_others_are_unaffected(engine):
    now = utcnow()
    first = take_slot(engine, user_id=1, limit=2, ttl_seconds=60, now=now)
    second = take_slot(engine, user_id=1, limit=2, ttl_seconds=60, now=now)
    assert first is not None and second is not None and first.index != second.index
    assert take_slot(engine, user_id=1, limit=2, ttl_seconds=60, now=now) is None
    assert take_slot(engine, user_id=2, limit=2, ttl_seconds=60, now=now) is not None
    assert held_slots(engine, user_id=1, now=now) == 2
    release_slot(engine, first)
    release_slot(engine, first)  # a second release is a no-op
    assert held_slots(engine, user_id=1, now=now) == 1
    again = take_slot(engine, user_id=1, limit=2, ttl_seconds=60, now=now)
    assert again is not None and again.index == first.index


def test_a_crashed_process_slot_expires_and_its_late_release_frees_nothing(engine):
    now = utcnow()
    lost = take_slot(engine, user_id=7, limit=1, ttl_seconds=60, now=now)
    assert lost is not None
    assert take_slot(engine, user_id=7, limit=1, ttl_seconds=60, now=now) is None
    later = now + timedelta(seconds=61)
    assert held_slots(engine, user_id=7, now=later) == 0
    taken = take_slot(engine, user_id=7, limit=1, ttl_seconds=60, now=later)
    assert taken is not None and taken.index == lost.index
    release_slot(engine, lost)  # the crashed holder's release: someone else holds it now
    assert held_slots(engine, user_id=7, now=later) == 1
    release_slot(engine, taken)
    assert held_slots(engine, user_id=7, now=later) == 0


def test_racing_processes_take_each_slot_once(engine):
    start = threading.Barrier(6)
    taken = []

    def take() -> None:
        start.wait()
        slot = take_slot(engine, user_id=3, limit=2, ttl_seconds=60)
        if slot is not None:
            taken.append(slot.index)

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == [0, 1]


def test_slots_stay_out_of_the_labeling_queue(engine):
    """The slots share the leases table with the labeling queue, under keys no SAE has."""
    take_slot(engine, user_id=1, limit=1, ttl_seconds=60)
    # The queue looks up its SAE first (and clears leases only under that SAE's id): no SAE is
    # named like a slot key, so it never clears a slot.
    with pytest.raises(NotFoundError, match="no SAE"):
        next_feature(engine, sae_id="generation/1", user="alice")
    assert held_slots(engine, user_id=1) == 1
