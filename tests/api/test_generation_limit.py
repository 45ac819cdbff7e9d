"""The per-person generation limit under auth=token, on two app instances over one database (two
server processes): a person past the limit gets 429 with Retry-After in either one, another
person is unaffected, and a slot is freed when its generation ends, when its client leaves and
when its request is cancelled. The model steps only when the test releases it (no sleeps)."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
import pytest

from app.store.db import make_engine
from app.store.generation_slots import held_slots
from app.store.users import add_user
from tests.api.steer_support import (
    WAIT,
    ASGICall,
    SteppedService,
    build_database,
    make_app,
    request,
    wait_ready,
)

SECRET = "k" * 40


@pytest.fixture
def database(tmp_path):
    return build_database(tmp_path)


@pytest.fixture
def people(database):
    engine = make_engine(database[1])
    try:
        found = {}
        for name in ("alice", "bob"):
            info, token = add_user(engine, name=name, role="viewer")
            found[name] = (info.id, {"Authorization": f"Bearer {token}"})
        yield found
    finally:
        engine.dispose()


def held(database, user_id: int) -> int:
    engine = make_engine(database[1])
    try:
        return held_slots(engine, user_id=user_id)
    finally:
        engine.dispose()


@contextlib.asynccontextmanager
async def running(database, **overrides):
    """An auth=token app, its model loaded, its generations stepped by the test."""
    app = make_app(database, auth="token", secret_key=SECRET, **overrides)
    async with app.router.lifespan_context(app):
        await asyncio.to_thread(wait_ready, app)
        stepped = SteppedService(app.state.engine_state.service)
        app.state.engine_state.service = stepped
        try:
            yield app, stepped
        finally:
            for _ in range(100):  # let anything still held finish
                stepped.permits.release()


async def admitted(app, count: int) -> None:
    while app.state.model_worker.pending < count:
        await asyncio.sleep(0)


async def refused(call: ASGICall) -> tuple[dict, str]:
    start = await asyncio.wait_for(call.sent.get(), WAIT)
    body = await asyncio.wait_for(call.sent.get(), WAIT)
    assert start["status"] == 429, body
    headers = dict(start["headers"])
    return {k.decode(): v.decode() for k, v in headers.items()}, \
        orjson.loads(body["body"])["error"]["message"]


async def finish(call: ASGICall, stepped: SteppedService) -> None:
    """Let the model step freely until the call's response is complete; it is a 200."""
    for _ in range(100):
        stepped.permits.release()
    await asyncio.wait_for(call.task, WAIT)
    assert (await call.status()) == 200


def test_the_limit_holds_across_processes_and_spares_other_people(database, people):
    (alice, as_alice), (bob, as_bob) = people["alice"], people["bob"]

    async def scenario() -> None:
        async with running(database, steer_per_user=2) as (one, one_steps), \
                running(database, steer_per_user=2) as (two, two_steps):
            streaming = ASGICall(one, "/api/v1/steer/stream", request(), headers=as_alice)
            await admitted(one, 1)
            waiting = ASGICall(two, "/api/v1/steer", request(), headers=as_alice)
            await admitted(two, 1)
            assert held(database, alice) == 2
            for app, path in ((one, "/api/v1/steer/sweep"), (two, "/api/v1/steer/stream"),
                              (one, "/api/v1/steer")):
                headers, message = await refused(ASGICall(
                    app, path, request(index=1, values=[1.0]), headers=as_alice))
                assert int(headers["retry-after"]) > 0
                assert "alice already runs 2 generations" in message
                assert "SAESCOPE_STEER_PER_USER" in message
            # Bob is admitted while alice is at her limit.
            other = ASGICall(two, "/api/v1/steer/sweep", request(index=1, values=[1.0]),
                             headers=as_bob)
            await admitted(two, 2)
            assert held(database, bob) == 1
            for call, steps in ((streaming, one_steps), (waiting, two_steps),
                                (other, two_steps)):
                await finish(call, steps)
            assert held(database, alice) == 0 and held(database, bob) == 0
            # Done generations freed their slots: alice runs again.
            again = ASGICall(one, "/api/v1/steer", request(), headers=as_alice)
            await finish(again, one_steps)

    asyncio.run(scenario())


@pytest.mark.parametrize("path", ["/api/v1/steer/stream", "/api/v1/steer", "/api/v1/steer/sweep"])
def test_a_client_that_leaves_frees_its_slot(database, people, path):
    alice, as_alice = people["alice"]
    body = request(index=1, values=[1.0, 2.0], max_new_tokens=20)

    async def scenario() -> None:
        async with running(database, steer_per_user=1) as (app, steps):
            call = ASGICall(app, path, body, headers=as_alice)
            steps.permits.release()  # the prefill
            await admitted(app, 1)
            await refused(ASGICall(app, path, body, headers=as_alice))
            call.left.set()  # the stop button: the browser aborts the fetch
            steps.permits.release()  # the JSON routes see the disconnect after a step
            await asyncio.wait_for(call.task, WAIT)
            assert held(database, alice) == 0
            await finish(ASGICall(app, path, body, headers=as_alice), steps)

    asyncio.run(scenario())


def test_a_cancelled_request_frees_its_slot(database, people):
    """A request task cancelled mid-generation (a server shutting down, a proxy's timeout)
    still frees its slot: the release is shielded from the cancellation."""
    alice, as_alice = people["alice"]

    async def scenario() -> None:
        async with running(database, steer_per_user=1) as (app, _):
            call = ASGICall(app, "/api/v1/steer", request(), headers=as_alice)
            await admitted(app, 1)
            assert held(database, alice) == 1
            call.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call.task
            assert held(database, alice) == 0

    asyncio.run(scenario())


def test_without_sign_in_only_the_queue_bounds_generations(database):
    """auth=none: the local admin takes no slot, so more generations than the per-person limit
    run at once, up to the queue's size."""

    async def scenario() -> None:
        app = make_app(database, steer_per_user=1, model_queue_size=3)
        async with app.router.lifespan_context(app):
            await asyncio.to_thread(wait_ready, app)
            stepped = SteppedService(app.state.engine_state.service)
            app.state.engine_state.service = stepped
            calls = [ASGICall(app, "/api/v1/steer", request()) for _ in range(3)]
            await admitted(app, 3)
            for call in calls:
                await finish(call, stepped)

    asyncio.run(scenario())
