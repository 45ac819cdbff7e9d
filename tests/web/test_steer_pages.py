"""The steering lab's pages through the real app: the lab prefilled from a feature page's link or
a saved run, a saved run's page showing what was saved (hostile text escaped), no inline code."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.factories import synthetic_database, synthetic_run

XSS = "</script><img src=x onerror=alert(1)>"
MODEL_ID = "tiny-llama"
SAE_ID = "1-res-topk-64"


@pytest.fixture
def client(tmp_path) -> Iterator[TestClient]:
    db_url = f"sqlite:///{tmp_path / 'steer-pages.db'}"
    synthetic_database(db_url, synthetic_run(d_sae=32, n_dead=2, seed=3))
    settings = Settings(home=tmp_path, database_url=db_url, load_model=False,
                        steer_max_new_tokens=40)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def _json_block(page: str, block_id: str) -> object:
    match = re.search(rf'<script type="application/json" id="{block_id}">(.*?)</script>', page,
                      re.S)
    assert match, block_id
    return json.loads(match.group(1))


def _no_inline_code(page: str) -> None:
    """Every <script> loads a file or holds JSON data (a CSP of script-src 'self' holds)."""
    for attrs, body in re.findall(r"<script([^>]*)>(.*?)</script>", page, re.S):
        assert "src=" in attrs or 'type="application/json"' in attrs, attrs
        assert "src=" not in attrs or not body.strip()


def test_feature_page_links_to_the_lab_prefilled(client) -> None:
    page = client.get(f"/{MODEL_ID}/{SAE_ID}/3").text
    link = re.search(r'href="(/steer\?[^"]+)" data-steer-link', page)
    assert link, "no steer link on the feature page"
    lab = client.get(html.unescape(link.group(1)))
    assert lab.status_code == 200
    prefill = _json_block(lab.text, "steer-prefill")
    assert prefill["sae_id"] == SAE_ID and prefill["features"][0]["index"] == 3
    assert prefill["features"][0]["mode"] == "add" and prefill["features"][0]["value"] > 0
    assert 'data-max-new-tokens="40"' in lab.text
    assert [s["id"] for s in _json_block(lab.text, "steer-saes")] == [SAE_ID]
    _no_inline_code(lab.text)


def test_a_saved_run_has_a_page_and_reopens_in_the_lab(client) -> None:
    request = {"sae_id": SAE_ID, "prompt": f"say {XSS}", "features": [
        {"index": 4, "mode": "clamp", "value": 3.5}], "max_new_tokens": 8}
    saved = client.post("/api/v1/steer/runs", json={
        "name": XSS, "request": request, "default_text": f"plain {XSS}",
        "steered_text": "steered text"})
    assert saved.status_code == 201, saved.text
    run_id = saved.json()["id"]
    page = client.get(f"/steer/runs/{run_id}")
    assert page.status_code == 200
    assert XSS not in page.text and html.escape(XSS) in page.text
    assert f'href="/{MODEL_ID}/{SAE_ID}/4"' in page.text and "clamp" in page.text
    assert "steered text" in page.text
    _no_inline_code(page.text)
    lab = client.get(f"/steer?run={run_id}")
    prefill = _json_block(lab.text, "steer-prefill")
    assert prefill["prompt"] == request["prompt"] and prefill["features"][0]["value"] == 3.5
    assert XSS not in lab.text  # tojson escapes < and >
    assert client.get("/steer/runs/999").status_code == 404
    assert client.get("/steer?run=999").status_code == 404
