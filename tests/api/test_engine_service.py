"""The real engine service behind the API: tiny random Llama + a random TopK SAE from a folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.engine.sae import SAE
from app.engine.tiny import build_tiny
from app.main import create_app
from app.settings import Settings
from tests.factories import SERVED_HOOK, SERVED_SAE_ID, engine_ready, served_sae_database

SAE_ID = SERVED_SAE_ID
HOOK = SERVED_HOOK
TEXT = "def add(a, b):\n    return a + b  # sum"


@pytest.fixture(scope="module")
def lm():
    return build_tiny("tiny-llama")


@pytest.fixture
def served(tmp_path, lm):
    folder, url = served_sae_database(tmp_path, lm=lm)
    settings = Settings(home=tmp_path, database_url=url, load_model=True, max_text_tokens=64)
    with TestClient(create_app(settings)) as client:
        engine_ready(client.app)
        yield client, SAE.load(folder)


def _reference(lm, sae, text: str) -> tuple[list[int], np.ndarray]:
    ids = lm.tokenize(text)
    with torch.inference_mode():
        acts = sae.encode(lm.run_to_hook(ids, HOOK)[0]).numpy()
    return ids, acts


def test_search_matches_a_direct_encode(served, lm):
    client, sae = served
    ids, acts = _reference(lm, sae, TEXT)
    body = client.post(f"/api/v1/saes/{SAE_ID}/search",
                       json={"text": TEXT, "top_k": 3, "n_features": 5}).json()
    assert body["token_ids"] == ids
    assert body["tokens"] == [lm.token_strings()[i] for i in ids]
    assert body["special"][0] is True and not any(body["special"][1:])
    for pos, row in enumerate(body["per_token"]):
        expected = -np.sort(-acts[pos])[:3]
        expected = expected[expected > 0]
        assert [f["value"] for f in row] == pytest.approx(expected.tolist(), rel=1e-5)
        for f in row:
            assert acts[pos, f["index"]] == pytest.approx(f["value"], rel=1e-5)
    body_acts = acts[1:]  # BOS left out of the whole-text ranking
    max_per_feature = body_acts.max(axis=0)
    order = sorted(range(48), key=lambda f: -max_per_feature[f])[:5]
    got = body["top_features"]
    assert [f["max_value"] for f in got] == pytest.approx(max_per_feature[order].tolist(),
                                                          rel=1e-5)
    for f in got:
        assert f["n_tokens"] == int((body_acts[:, f["index"]] > 0).sum())
        assert f["sum_value"] == pytest.approx(float(body_acts[:, f["index"]].sum()), rel=1e-4)
        assert acts[f["max_token_index"], f["index"]] == pytest.approx(f["max_value"], rel=1e-5)


def test_feature_activations_match_a_direct_encode(served, lm):
    client, sae = served
    ids, acts = _reference(lm, sae, TEXT)
    feature = int(acts[1:].max(axis=0).argmax())
    body = client.post(f"/api/v1/saes/{SAE_ID}/features/{feature}/activations",
                       json={"text": TEXT}).json()
    assert body["values"] == pytest.approx(acts[:, feature].tolist(), rel=1e-5, abs=1e-6)
    assert body["maxValue"] == pytest.approx(float(acts[1:, feature].max()), rel=1e-5)


def test_token_cap_uses_the_real_tokenizer(served, lm):
    client, _ = served
    text = "a b " * 40
    n = len(lm.tokenize(text))
    assert n > 64
    response = client.post(f"/api/v1/saes/{SAE_ID}/search", json={"text": text})
    assert response.status_code == 422
    assert f"{n} tokens" in response.json()["error"]["message"]
