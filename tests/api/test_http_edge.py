"""The HTTP edge through the real app over a real SQLite file: bounded integers, body limits,
HEAD, error pages by path, security headers, timestamps with their offset, no server paths."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.factories import synthetic_database, synthetic_run

SAE_ID = "1-res-topk-64"
MODEL_ID = "tiny-llama"
FEATURES = f"/api/v1/saes/{SAE_ID}/features"
SEARCH = f"/api/v1/saes/{SAE_ID}/search"
HTML = {"Accept": "text/html,application/xhtml+xml"}


def assert_error(response, status: int, *fragments: str) -> None:  # noqa: ANN001
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["status"] == status
    for fragment in fragments:
        assert fragment in body["error"]["message"], body


@pytest.mark.parametrize("query", [
    {"page": 100000000000000000, "per_page": 100},
    {"page": 2**31},
])
def test_a_huge_page_is_a_422_naming_the_bound(client, query) -> None:
    assert_error(client.get(FEATURES, params=query), 422, "page", str(2**31 - 1))


@pytest.mark.parametrize("index", [2**31, 10**30])
def test_a_huge_feature_index_is_a_422(client, index) -> None:
    assert_error(client.get(f"{FEATURES}/{index}"), 422, "index")
    assert_error(client.post(f"{FEATURES}/{index}/activations", json={"text": "a"}), 422,
                 "index")


@pytest.mark.parametrize("token", ["9223372036854775808", "²", "①", "٣", str(2**31)])
def test_token_queries_that_are_not_ids_answer(client, token) -> None:
    # Unicode digits are text to match; a number past the id column matches nothing.
    response = client.get(FEATURES, params={"token": token})
    assert response.status_code == 200 and response.json()["count"] == 0
    page = client.get(f"/{MODEL_ID}/{SAE_ID}", params={"token": token}, headers=HTML)
    assert page.status_code == 200


def test_an_ascii_id_still_finds_its_features(client, records) -> None:
    token_id = int(records.features.logit_pos_ids[4, 0])  # any id; the query must not fail
    response = client.get(FEATURES, params={"token": str(token_id)})
    assert response.status_code == 200


def test_overview_page_bounds_are_an_html_422(client) -> None:
    for query in ({"page": 10**20}, {"jump": 10**25}, {"jump": -1}):
        page = client.get(f"/{MODEL_ID}/{SAE_ID}", params=query, headers=HTML)
        assert page.status_code == 422
        assert page.headers["content-type"].startswith("text/html")


def test_timestamps_carry_their_offset(client) -> None:
    run = client.get(f"/api/v1/saes/{SAE_ID}").json()["run"]
    assert run["created_at"].endswith(("Z", "+00:00"))
    label = client.get(f"{FEATURES}/4").json()["label"]
    assert label["updated_at"].endswith(("Z", "+00:00"))


# --- request bodies -------------------------------------------------------------------------


def test_a_body_over_the_limit_is_a_413_before_parsing(client, settings) -> None:
    from app.api.routes.search import max_body_bytes

    limit = max_body_bytes(settings)
    body = json.dumps({"text": "x" * (limit + 10)}).encode()
    declared = client.post(SEARCH, content=body, headers={"Content-Type": "application/json"})
    assert_error(declared, 413, f"{limit:,} bytes")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for start in range(0, len(body), 4096):
            yield body[start:start + 4096]

    streamed = client.post(SEARCH, content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(streamed, 413, f"{limit:,} bytes")
    # Under the limit, the same route answers as before (503: no model in these tests).
    assert client.post(SEARCH, json={"text": "hello"}).status_code == 503


def test_read_routes_have_the_default_limit(client) -> None:
    from app.main import DEFAULT_MAX_BODY_BYTES

    response = client.request("GET", "/api/v1/saes", content=b"x" * (DEFAULT_MAX_BODY_BYTES + 1))
    assert_error(response, 413)


@pytest.mark.parametrize("body", [b'{"text": ', b'{"text": "\xff\xfe"}', b"\x00\x01"])
def test_unparseable_json_is_a_422(client, body) -> None:
    response = client.post(SEARCH, content=body, headers={"Content-Type": "application/json"})
    assert_error(response, 422, "body: not valid JSON")


# --- HEAD, error pages, headers ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/saes", f"{FEATURES}/3", "/", f"/{MODEL_ID}/{SAE_ID}",
                                  "/docs", "/openapi.json"])
def test_head_answers_like_get_without_a_body(client, path) -> None:
    got = client.get(path)
    head = client.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["content-length"] == str(len(got.content))


def test_head_on_a_post_route_is_405(client) -> None:
    response = client.head(SEARCH)
    assert response.status_code == 405 and "POST" in response.headers["allow"]


@pytest.mark.parametrize("path", [f"/{MODEL_ID}/{SAE_ID}/anything", f"/{MODEL_ID}/{SAE_ID}/999",
                                  "/a/b/c/d", f"/{MODEL_ID}/nosuch"])
def test_missing_pages_get_the_html_error_page_whoever_asks(client, path) -> None:
    for headers in ({}, {"Accept": "*/*"}, HTML):
        page = client.get(path, headers=headers)
        assert page.status_code == 404
        assert page.headers["content-type"].startswith("text/html"), headers
    assert_error(client.get(path, headers={"Accept": "application/json"}), 404)


def test_missing_api_paths_stay_json(client) -> None:
    assert_error(client.get("/api/v1/nosuch", headers=HTML), 404)
    assert_error(client.get(f"{FEATURES}/999", headers=HTML), 404)


def test_security_headers(client) -> None:
    for path in ("/", f"/{MODEL_ID}/{SAE_ID}", f"/{MODEL_ID}/{SAE_ID}/3", "/docs",
                 "/api/v1/saes", "/nosuch"):
        headers = client.get(path, headers=HTML).headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "strict-origin-when-cross-origin"
        csp = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp, path
        if headers["content-type"].startswith("text/html"):
            assert csp.startswith("default-src 'self'; script-src 'self'; object-src 'none'; "
                                  "base-uri 'none'; frame-ancestors 'none'")
        else:
            assert csp.startswith("default-src 'none'")


def test_docs_load_swagger_from_this_server(client) -> None:
    page = client.get("/docs").text
    assert "<script>" not in page and "http" not in page.replace("http-equiv", "")
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/assets/swagger-ui/{asset}" in page
        assert client.get(f"/assets/swagger-ui/{asset}").status_code == 200
    assert client.get("/redoc").status_code == 404


def test_every_operation_documents_its_errors_in_the_one_shape(client) -> None:
    """ErrorOut everywhere, except OpenAI's shape on the OpenAI-compatible /v1 routes."""
    spec = client.get("/openapi.json").json()
    for path, methods in spec["paths"].items():
        shape = "OpenAIErrorOut" if path.startswith("/v1/") else "ErrorOut"
        for method, operation in methods.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": f"#/components/schemas/{shape}"}, (path, method)


# --- no server paths in public responses -------------------------------------------------------


@pytest.fixture
def pathy_client(tmp_path) -> Iterator[TestClient]:
    """A database whose records hold server paths, as a real build's do."""
    home = tmp_path / "data"
    rec = synthetic_run(d_sae=8, n_dead=1, seed=2, corpus="/srv/private/corpus.jsonl")
    rec.model.source = "preset tiny-llama (/opt/site-packages/llm_tiny/model.gguf)"
    rec.sae.path = str(home / "saes" / "tiny-llama" / SAE_ID)
    rec.sae.cfg = {"k": 4, "dataset_path": "/srv/private/tokens"}
    rec.sae.train_metrics = {"activation_cache": str(home / "cache" / "acts" / "abc"),
                             "explained_variance": 0.9}
    rec.run.config = {"model_source": "/opt/models/tiny", "sae_path": "/home/alice/saes/x",
                      "corpus": "/srv/private/corpus.jsonl", "seed": 1}
    rec.run.sae_stats = {**rec.run.sae_stats,
                         "eval": {"reused_from": {"file": "/home/alice/saes/x/evals.json"}}}
    db_url = f"sqlite:///{tmp_path / 'paths.db'}"
    synthetic_database(db_url, rec)
    settings = Settings(home=home, database_url=db_url, load_model=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def test_no_server_paths_in_public_responses(pathy_client) -> None:
    texts = {path: pathy_client.get(path, headers=HTML).text for path in (
        "/api/v1/models", "/api/v1/saes", f"/api/v1/saes/{SAE_ID}", f"{FEATURES}/3", "/",
        f"/{MODEL_ID}/{SAE_ID}", f"/{MODEL_ID}/{SAE_ID}/3")}
    for path, text in texts.items():
        for private in ("/srv/", "/opt/", "/home/alice", "/data/"):
            assert private not in text, (path, private)
    detail = pathy_client.get(f"/api/v1/saes/{SAE_ID}").json()
    assert detail["path"] == f"saes/tiny-llama/{SAE_ID}"  # under the data folder: relative
    assert detail["train_metrics"]["activation_cache"] == "cache/acts/abc"
    assert detail["corpus"] == detail["run"]["corpus"] == "corpus.jsonl"
    assert detail["run"]["config"]["sae_path"] == "x"
    assert detail["stats"]["eval"]["reused_from"]["file"] == "evals.json"
    model = pathy_client.get("/api/v1/models").json()["data"][0]
    assert model["source"] == "preset tiny-llama (model.gguf)"


def test_public_path_keeps_names_ids_and_urls() -> None:
    from app.api.public_paths import public_path

    home = Path("/srv/data")
    for value in ("python-docs", "EleutherAI/pythia-70m", "hub:org/name", "https://x.org/a/b",
                  "blocks.2.hook_resid_post", "1/2"):
        assert public_path(value, home=home) == value
    assert public_path("/srv/data/corpus/a.txt", home=home) == "corpus/a.txt"
    assert public_path("../up/corpus.txt", home=home) == "corpus.txt"


def test_a_model_that_fails_to_load_is_named_without_its_path(records, db_url, tmp_path) -> None:
    import time

    settings = Settings(home=tmp_path, database_url=db_url, model="/srv/private/nosuch.gguf")
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        state = c.app.state.engine_state
        deadline = time.monotonic() + 60
        while state.status not in ("failed", "ready") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state.status == "failed"
        response = c.post(SEARCH, json={"text": "hello"})
        assert response.status_code == 503
        assert "/srv/private" not in response.text and "nosuch.gguf" in response.text


def test_server_errors_carry_the_headers_too(client) -> None:
    def boom() -> None:
        raise RuntimeError("internals")

    client.app.add_api_route("/api/v1/boom", boom)
    response = client.get("/api/v1/boom")
    assert_error(response, 500, "internal server error")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-security-policy"].startswith("default-src 'none'")


@pytest.mark.parametrize("url", [
    "/api/v1/saes/a%00b", f"{FEATURES}?q=a%00", f"{FEATURES}?token=%00", f"{FEATURES}?tag=x%00",
    "/api/v1/saes?model_id=%00", "/api/v1/saes/a%00/features/1",
])
def test_a_nul_character_is_a_422_before_sql(client, url) -> None:
    # PostgreSQL refuses NUL in text; SQLite would only find nothing.
    assert_error(client.get(url), 422)
    page = client.get(f"/{MODEL_ID}/{SAE_ID}?q=a%00", headers=HTML)
    assert page.status_code == 422 and page.headers["content-type"].startswith("text/html")
