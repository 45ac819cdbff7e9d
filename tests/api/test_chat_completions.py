"""POST /v1/chat/completions on the real engine service (tiny random Llama, no chat template, so
the plain transcript): OpenAI's response and chunk shapes, the same text as the engine's own
reply, streaming, stop strings, seeded sampling, and every error in OpenAI's error shape
(validation, unknown model, limits, no model, a full queue, auth, cross-site, body size)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient

from app.api.deps import get_engine_state
from app.api.model_service import EngineState
from app.engine import chat
from app.engine.tiny import build_tiny
from app.main import create_app
from app.settings import Settings
from app.store.db import make_engine, upgrade
from app.store.users import add_user

MODEL = "tiny-llama"
URL = "/v1/chat/completions"
WAIT = 60  # seconds; only a broken server ever waits this long
MESSAGES = [{"role": "system", "content": "You describe features."},
            {"role": "user", "content": "What does the fox do?"}]
SECRET = "s" * 40


def make_settings(tmp_path, **overrides) -> Settings:
    values = {"home": tmp_path, "database_url": f"sqlite:///{tmp_path / 'chat.db'}",
              "load_model": True, "model": MODEL, "steer_max_new_tokens": 24,
              "chat_max_prompt_tokens": 64, **overrides}
    return Settings(**values)


def start(app) -> None:
    # The model loads on the model thread ahead of any job: a job submitted now runs after it.
    app.state.model_worker.submit(lambda: None).result(WAIT)
    assert app.state.engine_state.status == "ready", app.state.engine_state.message


@pytest.fixture(scope="module")
def lm():
    return build_tiny(MODEL)


@pytest.fixture
def client(tmp_path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(tmp_path)), raise_server_exceptions=False) as c:
        start(c.app)
        yield c


def body(**overrides):
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "temperature": 0,
            **overrides}


def assert_openai_error(response: httpx.Response, status: int, *, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in {"invalid_request_error", "authentication_error",
                             "permission_error", "rate_limit_error", "server_error"}
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def chunks(raw: str) -> list[dict | str]:
    out: list[dict | str] = []
    for line in raw.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


def test_reply_in_openai_shape_equals_the_engines_reply(client, lm):
    response = client.post(URL, json=body())
    assert response.status_code == 200, response.text
    out = response.json()
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["object"] == "chat.completion" and out["model"] == MODEL
    assert out["id"].startswith("chatcmpl-") and isinstance(out["created"], int)
    [choice] = out["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    expected = chat.reply(lm, MESSAGES, max_new_tokens=12)
    assert choice["message"]["content"] == expected["text"]
    assert choice["finish_reason"] == expected["finish_reason"]
    usage = out["usage"]
    prompt = chat.prompt_ids(lm, MESSAGES, max_tokens=64)
    assert usage["prompt_tokens"] == len(prompt)
    assert usage["completion_tokens"] == expected["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 12


def test_seeded_sampling_repeats_and_max_tokens_is_honoured(client):
    sampled = body(temperature=1.0, top_p=0.9, seed=7, max_tokens=10)
    first = client.post(URL, json=sampled).json()
    assert first["choices"] == client.post(URL, json=sampled).json()["choices"]
    assert first["usage"]["completion_tokens"] <= 10
    # Without max_tokens: the deployment's limit (steer_max_new_tokens = 24).
    whole = client.post(URL, json=body(max_tokens=None)).json()
    assert whole["usage"]["completion_tokens"] <= 24
    newer = client.post(URL, json=body(max_tokens=None, max_completion_tokens=3)).json()
    assert newer["usage"]["completion_tokens"] <= 3


def test_stream_chunks_add_up_to_the_reply(client):
    whole = client.post(URL, json=body()).json()
    response = client.post(URL, json=body(stream=True, stream_options={"include_usage": True}))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = chunks(response.text)
    assert events[-1] == "[DONE]"
    objects = events[:-1]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == objects[0]["id"]
               and e["model"] == MODEL for e in objects)
    assert objects[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *pieces, finish, usage = objects
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in pieces)
    assert text == whole["choices"][0]["message"]["content"]
    assert finish["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert finish["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    # Without include_usage, the finish chunk comes last before [DONE].
    plain = chunks(client.post(URL, json=body(stream=True)).text)
    assert plain[-2]["choices"][0]["finish_reason"] is not None and "usage" not in plain[-2]


def test_stop_string_ends_the_reply_before_it(client):
    text = client.post(URL, json=body(max_tokens=24)).json()["choices"][0]["message"]["content"]
    cut = len(text) // 2
    stop = text[cut:cut + 3]
    assert len(stop) == 3, text
    out = client.post(URL, json=body(max_tokens=24, stop=[stop, "never seen"])).json()
    assert out["choices"][0]["message"]["content"] == text[:text.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"
    streamed = chunks(client.post(URL, json=body(max_tokens=24, stop=stop, stream=True)).text)
    assert "".join(e["choices"][0]["delta"].get("content") or ""
                   for e in streamed[:-1]) == text[:text.index(stop)]


def test_models_lists_the_loaded_model(client):
    out = client.get("/v1/models").json()
    assert out["object"] == "list"
    assert [(m["id"], m["object"]) for m in out["data"]] == [(MODEL, "model")]


@pytest.mark.parametrize(("request_body", "param"), [
    ({"model": MODEL}, "messages"),
    (body(messages=[]), "messages"),
    (body(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role"),
    (body(temperature=3), "temperature"),
    (body(n=2), "n"),
    (body(n=1.0), "n"),  # strict types, as the schema says: no 1.0 for a count
    (body(stream_options={"include_usage": 0}), "stream_options.include_usage"),
    (body(stop=["a", "b", "c", "d", "e"]), "stop"),
    (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
     None),
])
def test_invalid_requests_are_openai_400s(client, request_body, param):
    error = assert_openai_error(client.post(URL, json=request_body), 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_limits_unknown_model_and_bad_json(client):
    assert_openai_error(client.post(URL, json=body(max_tokens=25)), 400, param="max_tokens")
    assert_openai_error(client.post(URL, json=body(model="gpt-4o")), 404, param="model",
                        code="model_not_found")
    long = [{"role": "user", "content": "the fox " * 200}]
    error = assert_openai_error(client.post(URL, json=body(messages=long)), 400,
                                param="messages", code="context_length_exceeded")
    assert "SAESCOPE_CHAT_MAX_PROMPT_TOKENS" in error["message"]
    assert_openai_error(client.post(URL, content=b"{not json",
                                    headers={"content-type": "application/json"}), 400)
    assert_openai_error(client.post(URL, content=b"x" * (3 * 1024 * 1024),
                                    headers={"content-type": "application/json"}), 413,
                        code="request_too_large")
    assert_openai_error(client.get(URL), 405)
    assert_openai_error(client.get("/v1/no-such-route"), 404)
    # Text parts are joined: the same reply as the string.
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
             for m in MESSAGES]
    assert client.post(URL, json=body(messages=parts)).json()["choices"] == client.post(
        URL, json=body()).json()["choices"]


def test_no_model_is_a_503_and_an_empty_model_list(tmp_path):
    app = create_app(make_settings(tmp_path, load_model=False))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert_openai_error(client.post(URL, json=body()), 503, code="service_unavailable")
        assert client.get("/v1/models").json() == {"object": "list", "data": []}
        # Still a 400 first when the request itself is wrong.
        assert_openai_error(client.post(URL, json=body(max_tokens=1000)), 400)


def test_auth_token_needs_a_bearer_and_refuses_cross_site(tmp_path):
    settings = make_settings(tmp_path, auth="token", secret_key=SECRET)
    upgrade(settings.db_url)
    engine = make_engine(settings.db_url)
    _, token = add_user(engine, name="ann", role="viewer")
    engine.dispose()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        start(client.app)
        assert_openai_error(client.post(URL, json=body()), 401, code="invalid_api_key")
        assert_openai_error(client.post(URL, json=body(),
                                        headers={"Authorization": "Bearer nope"}), 401)
        bearer = {"Authorization": f"Bearer {token}"}
        # An API client: a Bearer token and no Origin passes the cross-site gate.
        assert client.post(URL, json=body(), headers=bearer).status_code == 200
        assert client.get("/v1/models", headers=bearer).json()["data"][0]["id"] == MODEL
        foreign = {**bearer, "Origin": "https://evil.example"}
        assert_openai_error(client.post(URL, json=body(), headers=foreign), 403)


class BlockingChat:
    """chat_stream blocks on its first step until released, so jobs pile up in the queue (a
    real model cannot be made to wait on demand)."""

    model_id = MODEL

    def __init__(self) -> None:
        self.release = threading.Event()

    def chat_stream(self, **kwargs):
        assert self.release.wait(30), "test never released the fake model"
        yield {"text": "ok", "finish_reason": "stop", "prompt_tokens": 3,
               "completion_tokens": 1}


def test_full_queue_is_an_openai_503_with_retry_after(tmp_path):
    service = BlockingChat()
    app = create_app(make_settings(tmp_path, load_model=False, model_queue_size=1))
    app.dependency_overrides[get_engine_state] = lambda: EngineState(status="ready",
                                                                     service=service)

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                first = asyncio.create_task(client.post(URL, json=body()))
                worker = app.state.model_worker
                for _ in range(500):
                    if worker.pending == 1:
                        break
                    await asyncio.sleep(0.01)
                assert worker.pending == 1
                second = await asyncio.wait_for(client.post(URL, json=body()), 10)
                assert_openai_error(second, 503, code="service_unavailable")
                assert second.headers["retry-after"] == "2"
                service.release.set()
                done = await asyncio.wait_for(first, 10)
                assert done.json()["choices"][0]["message"]["content"] == "ok"

    asyncio.run(scenario())
