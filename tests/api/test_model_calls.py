"""Model calls through the bounded queue: full queue -> 503 + Retry-After at once, input caps.

The model here is a fake on purpose: a slow model cannot be made to block on demand, and these
tests are about the queue and the caps, not the numbers (test_engine_service.py runs a real one).
"""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from app.api.deps import get_engine_state
from app.api.model_service import EngineState
from app.main import create_app

SAE_ID = "1-res-topk-64"


class BlockingService:
    """Tokenizes on whitespace; search blocks until `release` is set, so calls pile up."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls = 0

    def tokenize(self, *, sae_id: str, text: str) -> list[int]:
        return [1] + [len(word) for word in text.split()]

    def search(self, *, sae_id: str, ids: list[int], top_k: int, n_features: int) -> dict:
        self.calls += 1
        self.started.set()
        assert self.release.wait(30), "test never released the fake model"
        return {
            "tokens": ["<bos>"] + [f"w{i}" for i in ids[1:]], "token_ids": ids,
            "special": [True] + [False] * (len(ids) - 1),
            "per_token": [[]] + [[{"index": 4, "value": 2.5}, {"index": 9, "value": 1.0}]
                                 for _ in ids[1:]],
            "top_features": [{"index": 4, "max_value": 2.5, "max_token_index": 1,
                              "sum_value": 2.5 * (len(ids) - 1), "n_tokens": len(ids) - 1}],
        }

    def feature_activations(self, *, sae_id: str, ids: list[int], index: int) -> dict:
        return {"tokens": [str(i) for i in ids], "token_ids": ids,
                "special": [True] + [False] * (len(ids) - 1),
                "values": [9.0] + [float(i) for i in ids[1:]]}


def _app(settings, service):
    app = create_app(settings)
    app.dependency_overrides[get_engine_state] = lambda: EngineState(status="ready",
                                                                     service=service)
    return app


def test_full_queue_answers_503_with_retry_after_at_once(records, settings):
    service = BlockingService()
    app = _app(settings, service)  # model_queue_size=2

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                url = f"/api/v1/saes/{SAE_ID}/search"
                first = asyncio.create_task(client.post(url, json={"text": "a bb"}))
                second = asyncio.create_task(client.post(url, json={"text": "ccc"}))
                worker = app.state.model_worker
                for _ in range(500):
                    if worker.pending == 2:
                        break
                    await asyncio.sleep(0.01)
                assert worker.pending == 2
                # The queue is full: a third call is refused without waiting for the model.
                third = await asyncio.wait_for(client.post(url, json={"text": "d"}), 10)
                assert third.status_code == 503
                assert third.headers["retry-after"] == "2"
                assert third.json()["error"]["status"] == 503
                assert "busy" in third.json()["error"]["message"]
                assert not first.done() and not second.done()
                service.release.set()
                ok1, ok2 = await asyncio.gather(first, second)
                assert ok1.status_code == ok2.status_code == 200
                assert worker.pending == 0
                body = ok1.json()
                assert body["tokens"] == ["<bos>", "w1", "w2"]
                assert body["top_features"][0]["label"] == "digits"  # joined from labels
                assert body["per_token"][1][0] == {"index": 4, "value": 2.5, "label": "digits"}
                assert body["per_token"][1][1]["label"] is None

    asyncio.run(scenario())
    assert service.calls == 2


def test_text_too_long_is_a_clear_422(records, settings):
    from fastapi.testclient import TestClient

    service = BlockingService()
    service.release.set()
    with TestClient(_app(settings, service)) as client:  # max_text_tokens=16
        too_many = " ".join(["w"] * 16)  # 16 words + BOS = 17 tokens
        response = client.post(f"/api/v1/saes/{SAE_ID}/search", json={"text": too_many})
        assert response.status_code == 422
        message = response.json()["error"]["message"]
        assert "17 tokens" in message and "16" in message and "SAESCOPE_MAX_TEXT_TOKENS" in message
        # Over the character cap (16 tokens x 32) but inside the body limit: 422 before tokenizing.
        long = client.post(f"/api/v1/saes/{SAE_ID}/search", json={"text": "x" * 1000})
        assert long.status_code == 422
        assert "characters" in long.json()["error"]["message"]
        assert service.calls == 0
        fits = client.post(f"/api/v1/saes/{SAE_ID}/search", json={"text": " ".join(["w"] * 15)})
        assert fits.status_code == 200
        assert client.post(f"/api/v1/saes/{SAE_ID}/search",
                           json={"text": "w", "top_k": 0}).status_code == 422


@pytest.mark.parametrize("index,status", [(3, 200), (32, 404)])
def test_feature_activations(records, settings, index, status):
    from fastapi.testclient import TestClient

    with TestClient(_app(settings, BlockingService())) as client:
        response = client.post(f"/api/v1/saes/{SAE_ID}/features/{index}/activations",
                               json={"text": "a bbb cc"})
        assert response.status_code == status
        if status == 200:
            body = response.json()
            assert body["values"] == [9.0, 1.0, 3.0, 2.0]
            # The max skips the BOS position, whose value is larger.
            assert (body["maxValue"], body["maxValueTokenIndex"]) == (3.0, 2)


def test_unknown_sae_is_404_before_the_model_state(records, settings):
    from fastapi.testclient import TestClient

    with TestClient(create_app(settings)) as client:  # no model loaded
        response = client.post("/api/v1/saes/nope/search", json={"text": "hi"})
        assert response.status_code == 404
        loaded = client.post(f"/api/v1/saes/{SAE_ID}/search", json={"text": "hi"})
        assert loaded.status_code == 503
