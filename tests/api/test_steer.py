"""The steering API on the real engine service (tiny random Llama + a random TopK SAE): JSON and
server-sent events, streaming step by step with the model released by the test (no sleeps), a
disconnect cancelling, bounds as 422s, a full queue as 503, sweeps, saved runs and vectors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.auth import Principal
from app.api.deps import current_user
from tests.api.steer_support import (
    HOOK,
    SAE_ID,
    STEERED,
    WAIT,
    ASGICall,
    SteppedService,
    build_database,
    make_app,
    parse_sse,
    request,
    wait_ready,
)


@pytest.fixture(scope="module")
def database(tmp_path_factory) -> tuple[Path, str]:
    return build_database(tmp_path_factory.mktemp("steer"))


@pytest.fixture
def client(database) -> Iterator[TestClient]:
    with TestClient(make_app(database), raise_server_exceptions=False) as c:
        wait_ready(c.app)
        yield c


def test_json_side_by_side(client):
    plain = client.post("/api/v1/steer", json=request()).json()
    assert plain["default"] == plain["steered"]  # greedy, no features: identical
    steered = client.post("/api/v1/steer", json=request(features=STEERED)).json()
    assert steered["default"] == plain["default"]
    assert steered["steered"]["token_ids"] != steered["default"]["token_ids"]
    assert set(steered["steered"]) == {"text", "tokens", "token_ids", "stop_reason"}
    # A tiny temperature samples from a one-hot distribution: the greedy text.
    tiny = client.post("/api/v1/steer", json=request(features=STEERED, temperature=1e-300,
                                                      seed=3)).json()
    assert tiny == steered
    sampled = request(features=STEERED, temperature=1.0, top_p=0.9, seed=11)
    assert client.post("/api/v1/steer", json=sampled).json() == client.post(
        "/api/v1/steer", json=sampled).json()


def test_sse_events_add_up_to_the_json_texts(client):
    body = request(features=STEERED)
    response = client.post("/api/v1/steer/stream", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1][0] == "done" and {e for e, _ in events[:-1]} == {"token"}
    whole = client.post("/api/v1/steer", json=body).json()
    for which in ("default", "steered"):
        pieces = [d for e, d in events if e == "token" and d["which"] == which]
        assert "".join(d["text"] for d in pieces) == whole[which]["text"]
        indices = [d["index"] for d in pieces]
        assert indices == sorted(indices)
        assert events[-1][1][which] == {"tokens": len(whole[which]["token_ids"]),
                                        "stop_reason": whole[which]["stop_reason"]}


def test_the_stream_delivers_tokens_as_the_model_steps(database):
    app = make_app(database)

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            await asyncio.to_thread(wait_ready, app)
            stepped = SteppedService(app.state.engine_state.service)
            app.state.engine_state.service = stepped
            call = ASGICall(app, "/api/v1/steer/stream",
                            request(features=STEERED, max_new_tokens=12))
            stepped.permits.release()  # the prefill: each stream's first token
            assert await call.status() == 200
            first = await call.until(lambda ev: {d["which"] for _, d in ev} >= {"default",
                                                                                 "steered"})
            assert all(e == "token" for e, _ in first)
            stepped.permits.release()  # one more token per stream, still no done
            second = await call.until(lambda ev: len(ev) > len(first))
            assert "done" not in {e for e, _ in second}
            for _ in range(12):
                stepped.permits.release()
            events = await call.until(lambda ev: ev and ev[-1][0] == "done")
            await asyncio.wait_for(call.task, WAIT)
            assert events[-1][1]["steered"]["tokens"] >= 2
            assert app.state.model_worker.pending == 0

    asyncio.run(scenario())


def test_a_client_that_leaves_cancels_its_generation(database):
    app = make_app(database)

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            await asyncio.to_thread(wait_ready, app)
            stepped = SteppedService(app.state.engine_state.service)
            app.state.engine_state.service = stepped
            call = ASGICall(app, "/api/v1/steer/stream", request(max_new_tokens=20))
            stepped.permits.release()
            assert await call.status() == 200
            await call.until(lambda ev: len(ev) > 0)
            call.left.set()  # the browser goes away
            await asyncio.wait_for(call.task, WAIT)
            stepped.permits.release()  # the step the worker may be waiting in
            assert await asyncio.to_thread(stepped.closed.wait, WAIT)
            # The generator was closed on the model thread; the job no longer counts.
            await asyncio.wrap_future(app.state.model_worker.submit(lambda: None))
            assert app.state.model_worker.pending == 0
            assert "done" not in call.text

    asyncio.run(scenario())


def test_a_json_client_that_leaves_cancels_its_generation(database):
    app = make_app(database)

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            await asyncio.to_thread(wait_ready, app)
            stepped = SteppedService(app.state.engine_state.service)
            app.state.engine_state.service = stepped
            call = ASGICall(app, "/api/v1/steer", request(max_new_tokens=20))
            stepped.permits.release()  # the prefill
            while app.state.model_worker.pending < 1:
                await asyncio.sleep(0)
            call.left.set()
            stepped.permits.release()  # the route sees the disconnect after this step
            assert await asyncio.wait_for(call.task, WAIT) is None
            assert await asyncio.to_thread(stepped.closed.wait, WAIT)
            await asyncio.wrap_future(app.state.model_worker.submit(lambda: None))
            assert app.state.model_worker.pending == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("path", ["/api/v1/steer", "/api/v1/steer/stream"])
@pytest.mark.parametrize("bad,status,words", [
    ({"max_new_tokens": 25}, 422, "SAESCOPE_STEER_MAX_NEW_TOKENS"),
    ({"max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"temperature": 2.5}, 422, "temperature"),
    ({"top_p": 0}, 422, "top_p"),
    ({"features": [{"index": 1, "value": 1e9}]}, 422, "value"),
    ({"features": [{"index": 48}]}, 404, "features 0..47"),
    ({"features": [{"index": 1, "mode": "boost"}]}, 422, "mode"),
    ({"features": [{"index": 1}] * 17}, 422, "features"),
    ({"vectors": [{"name": "v"}] * 9}, 422, "vectors"),
    ({"sae_id": "nope"}, 404, "nope"),
    ({"features": [{"index": 1, "sae_id": "nope"}]}, 404, "nope"),
    ({"sae_id": "a\x00b"}, 422, "sae_id"),
    ({"vectors": [{"name": "missing"}]}, 404, "missing"),
    ({"prompt": " ".join(["word"] * 40)}, 422, "SAESCOPE_MAX_TEXT_TOKENS"),
    ({"chat_template": True}, 409, "chat template"),
    ({"prompt": ""}, 422, "prompt"),
])
def test_bad_requests_are_clear_errors(client, path, bad, status, words):
    response = client.post(path, json=request(**bad))
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]


def test_a_full_queue_refuses_a_generation_at_once(database):
    app = make_app(database, model_queue_size=1)

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            await asyncio.to_thread(wait_ready, app)
            stepped = SteppedService(app.state.engine_state.service)
            app.state.engine_state.service = stepped
            first = ASGICall(app, "/api/v1/steer/stream", request())
            while app.state.model_worker.pending < 1:
                await asyncio.sleep(0)  # until the first request is admitted (no model step)
            for path in ("/api/v1/steer", "/api/v1/steer/stream", "/api/v1/steer/sweep"):
                refused = ASGICall(app, path, request(index=1, values=[1.0]))
                assert await refused.status() == 503
                message = await asyncio.wait_for(refused.sent.get(), WAIT)
                assert b"busy" in message["body"]
            first.left.set()
            stepped.permits.release()
            await asyncio.wait_for(first.task, WAIT)

    asyncio.run(scenario())


def test_sweep(client):
    response = client.post("/api/v1/steer/sweep", json=request(
        index=5, mode="clamp", values=[0, 5, 50], max_new_tokens=6))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["value"] for c in body["cells"]] == [0, 5, 50]
    for cell in [body["default"], *body["cells"]]:
        assert cell["coherence"] < 0 and cell["realised"] is not None
    assert body["cells"][2]["realised"] > body["cells"][0]["realised"]
    too_many = client.post("/api/v1/steer/sweep", json=request(index=5, values=[1.0] * 13))
    assert too_many.status_code == 422


def test_saved_runs(client):
    out = client.post("/api/v1/steer", json=request(features=STEERED)).json()
    saved = client.post("/api/v1/steer/runs", json={
        "name": "tabs to fox", "request": request(features=STEERED),
        "default_text": out["default"]["text"], "steered_text": out["steered"]["text"]})
    assert saved.status_code == 201, saved.text
    run = saved.json()
    assert run["author"] == "local" and run["request"]["features"][0]["value"] == 60.0
    assert client.get(f"/api/v1/steer/runs/{run['id']}").json() == run
    listed = client.get("/api/v1/steer/runs", params={"sae_id": SAE_ID}).json()
    assert run["id"] in [r["id"] for r in listed["data"]]
    client.app.dependency_overrides[current_user] = lambda: Principal(name="someone else",
                                                                      role="annotator")
    assert client.delete(f"/api/v1/steer/runs/{run['id']}").status_code == 403
    del client.app.dependency_overrides[current_user]
    assert client.delete(f"/api/v1/steer/runs/{run['id']}").status_code == 204
    assert client.get(f"/api/v1/steer/runs/{run['id']}").status_code == 404
    bad = client.post("/api/v1/steer/runs", json={
        "name": "x", "request": request(sae_id="nope"), "default_text": "", "steered_text": ""})
    assert bad.status_code == 404


def test_saved_vectors(client):
    body = {"name": "fox-vs-code", "sae_id": SAE_ID, "positive": ["The quick brown fox"],
            "negative": ["for i in range(10):"], "position": "mean"}
    made = client.post("/api/v1/steer/vectors", json=body)
    assert made.status_code == 201, made.text
    vector = made.json()
    assert vector["hook_name"] == HOOK and len(vector["aligned"]) == 10
    assert client.post("/api/v1/steer/vectors", json=body).status_code == 409
    assert client.get("/api/v1/steer/vectors/fox-vs-code").json() == vector
    assert client.get("/api/v1/steer/vectors").json()["count"] == 1
    steered = client.post("/api/v1/steer", json=request(
        vectors=[{"name": "fox-vs-code", "value": 20.0}])).json()
    assert steered["steered"]["token_ids"] != steered["default"]["token_ids"]
    assert client.delete("/api/v1/steer/vectors/fox-vs-code").status_code == 204
    assert client.get("/api/v1/steer/vectors/fox-vs-code").status_code == 404


def test_openapi_states_the_deployments_bounds_and_405_names_every_method(client):
    spec = client.get("/openapi.json").json()
    for name in ("SteerIn", "SweepIn"):
        assert spec["components"]["schemas"][name]["properties"]["max_new_tokens"][
            "maximum"] == 24  # steer_max_new_tokens
    # Two routes serve /runs (GET and POST): a 405 there lists both.
    for path, allowed in (("/api/v1/steer/runs", "GET, POST"),
                          ("/api/v1/steer/runs/1", "DELETE, GET"),
                          ("/api/v1/steer", "POST")):
        response = client.put(path, json={})
        assert response.status_code == 405 and response.headers["allow"] == allowed, path
