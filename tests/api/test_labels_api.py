"""The labeling API: ETag / If-Match writes, roles, tokens, cross-site refusal, review, queue,
search, import/export, and the feature JSON's ETag."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.api.auth import check_auth_settings, host_allowed
from app.errors import ConfigError
from app.main import create_app
from app.settings import Settings
from app.store.db import make_engine
from app.store.users import add_user
from tests.api.conftest import SAE_ID

FEATURE = f"/api/v1/saes/{SAE_ID}/features"
SECRET = "s" * 40


def _put(client: TestClient, index: int, description: str, **headers: str):
    return client.put(f"{FEATURE}/{index}/label", json={"description": description},
                      headers=headers)


def test_create_edit_conflict_and_withdraw(client):
    created = _put(client, 3, "first", **{"If-None-Match": "*"})
    assert created.status_code == 201
    tag = created.headers["etag"]
    assert created.json()["etag"] == tag and created.json()["author"] == "local"
    assert _put(client, 3, "again", **{"If-None-Match": "*"}).status_code == 412
    assert _put(client, 3, "no precondition").status_code == 428
    assert _put(client, 3, "theirs", **{"If-None-Match": tag}).status_code == 412
    assert _put(client, 3, "other tag", **{"If-None-Match": '"9-9"'}).status_code == 428
    edited = _put(client, 3, "second", **{"If-Match": tag})
    assert edited.status_code == 200 and edited.headers["etag"] != tag
    stale = _put(client, 3, "stale", **{"If-Match": tag})
    assert stale.status_code == 412 and "version 2" in stale.json()["error"]["message"]
    mine = client.get(f"{FEATURE}/3/label")
    assert (mine.json()["description"], mine.headers["etag"]) == ("second",
                                                                   edited.headers["etag"])
    assert client.delete(f"{FEATURE}/3/label").status_code == 428
    assert client.delete(f"{FEATURE}/3/label", headers={"If-Match": tag}).status_code == 412
    gone = client.delete(f"{FEATURE}/3/label", headers={"If-Match": edited.headers["etag"]})
    assert gone.status_code == 204
    assert client.get(f"{FEATURE}/3/label").status_code == 404
    history = client.get(f"{FEATURE}/3/labels/history").json()["data"]
    assert [r["action"] for r in history] == ["withdraw", "edit", "create"]
    assert history[1]["before"]["description"] == "first"


@pytest.mark.parametrize(("body", "field"), [
    ({"description": "x" * 2001}, "description"),
    ({"description": "x", "tags": ["<script>"]}, "tags"),
    ({"description": "x", "tags": [f"t{i}" for i in range(21)]}, "tags"),
    ({"description": "x", "status": "great"}, "status"),
    ({"description": "x", "confidence": 2}, "confidence"),
])
def test_bad_label_is_422_naming_the_field(client, body, field):
    r = client.put(f"{FEATURE}/3/label", json=body, headers={"If-None-Match": "*"})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith(field)
    assert client.get(f"{FEATURE}/3/labels/history").json()["data"] == []


def test_unknown_sae_or_index_is_404(client):
    assert _put(client, 32, "x", **{"If-None-Match": "*"}).status_code == 404
    r = client.put("/api/v1/saes/nope/features/1/label", json={"description": "x"},
                   headers={"If-None-Match": "*"})
    assert r.status_code == 404


def test_hostile_text_is_stored_as_given(client):
    hostile = "<img src=x onerror=alert(1)> {{7*7}} \u202eevil " + "w" * 1000
    r = _put(client, 5, hostile, **{"If-None-Match": "*"})
    assert r.status_code == 201
    assert client.get(f"{FEATURE}/5/labels").json()["data"][0]["description"] == hostile


def test_feature_etag_follows_own_and_neighbour_labels(client):
    first = client.get(f"{FEATURE}/3")
    tag = first.headers["etag"]
    assert client.get(f"{FEATURE}/3", headers={"If-None-Match": tag}).status_code == 304
    _put(client, 3, "mine", **{"If-None-Match": "*"})
    after_own = client.get(f"{FEATURE}/3").headers["etag"]
    assert after_own != tag
    neighbour = first.json()["topkCosSimIndices"][0]
    _put(client, neighbour, "next door", **{"If-None-Match": "*"})
    assert client.get(f"{FEATURE}/3").headers["etag"] != after_own


def test_review_queue_search_progress(client):
    label = _put(client, 7, "Python keywords", **{"If-None-Match": "*"}).json()
    review_url = f"{FEATURE}/7/labels/{label['id']}/review"
    blind = client.post(review_url, json={"status": "accepted"})
    assert blind.status_code == 428 and label["etag"] in blind.json()["error"]["message"]
    r = client.post(review_url, json={"status": "accepted"}, headers={"If-Match": label["etag"]})
    assert (r.status_code, r.json()["version"], r.json()["reviewed_by"]) == (200, 2, "local")
    assert r.headers["etag"] == r.json()["etag"] != label["etag"]  # a review bumps the version
    stale = client.post(review_url, json={"status": "rejected"},
                        headers={"If-Match": label["etag"]})
    assert stale.status_code == 412
    assert client.post(f"{FEATURE}/8/labels/{label['id']}/review", json={"status": "accepted"},
                       headers={"If-Match": label["etag"]}).status_code == 404
    hits = client.get("/api/v1/labels/search", params={"q": "keyw"}).json()["data"]
    assert [h["label"]["feature_index"] for h in hits] == [7]
    first = client.post(f"/api/v1/saes/{SAE_ID}/queue/next").json()
    assert client.post(f"/api/v1/saes/{SAE_ID}/queue/{first['index']}/skip").status_code == 204
    second = client.post(f"/api/v1/saes/{SAE_ID}/queue/next", params={"order": "random",
                                                                      "seed": 3}).json()
    assert second["index"] != first["index"]
    progress = client.get(f"/api/v1/saes/{SAE_ID}/labels/progress").json()
    assert {p["author"]: p["total"] for p in progress["people"]}["local"] == 1


def test_cross_site_writes_are_refused(client):
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "https://evil.example"}, {"Origin": "null"}):
        r = client.put(f"{FEATURE}/3/label", json={"description": "x"},
                       headers={"If-None-Match": "*", **headers})
        assert r.status_code == 403, headers
    ok = client.put(f"{FEATURE}/3/label", json={"description": "x"},
                    headers={"If-None-Match": "*", "Sec-Fetch-Site": "same-origin",
                             "Origin": "http://testserver"})
    assert ok.status_code == 201
    assert client.get(f"{FEATURE}/3/label", headers={"Sec-Fetch-Site": "cross-site"}
                      ).status_code == 200  # reads are not writes


def test_host_allow_list():
    allowed = {"localhost", "127.0.0.1", "[::1]"}
    assert host_allowed("localhost:8000", allowed) and host_allowed("127.0.0.1:8000", allowed)
    assert host_allowed("[::1]:8000", allowed) and host_allowed("10.0.0.5", allowed)
    assert not host_allowed("evil.example.com", allowed)
    assert not host_allowed("rebind.attacker.net:8000", allowed)


def test_start_refuses_open_or_unkeyed_servers(tmp_path):
    with pytest.raises(ConfigError, match="loopback"):
        check_auth_settings(Settings(home=tmp_path, host="0.0.0.0"))
    for key in ("", "change-me", "short"):
        with pytest.raises(ConfigError, match="SAESCOPE_SECRET_KEY"):
            check_auth_settings(Settings(home=tmp_path, auth="token", secret_key=key,
                                         host="0.0.0.0"))
    check_auth_settings(Settings(home=tmp_path, auth="token", secret_key=SECRET, host="0.0.0.0"))


@pytest.fixture
def token_app(records, db_url, tmp_path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    engine = make_engine(db_url)
    tokens = {role: add_user(engine, name=f"{role}1", role=role)[1]
              for role in ("viewer", "annotator", "reviewer", "admin")}
    engine.dispose()
    settings = Settings(home=tmp_path, database_url=db_url, load_model=False, auth="token",
                        secret_key=SECRET)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c, tokens


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_roles_and_tokens(token_app):
    client, tokens = token_app
    anonymous = client.get(f"/api/v1/saes/{SAE_ID}")
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert client.get(f"/api/v1/saes/{SAE_ID}", headers=_bearer("sst_nope")).status_code == 401
    assert client.get(f"/api/v1/saes/{SAE_ID}",
                      headers=_bearer(tokens["viewer"])).status_code == 200
    viewer_write = client.put(f"{FEATURE}/3/label", json={"description": "x"},
                              headers={"If-None-Match": "*", **_bearer(tokens["viewer"])})
    assert viewer_write.status_code == 403
    made = client.put(f"{FEATURE}/3/label", json={"description": "x"},
                      headers={"If-None-Match": "*", **_bearer(tokens["annotator"])})
    assert (made.status_code, made.json()["author"]) == (201, "annotator1")
    review = f"{FEATURE}/3/labels/{made.json()['id']}/review"
    seen = {"If-Match": made.json()["etag"]}
    assert client.post(review, json={"status": "accepted"},
                       headers={**seen, **_bearer(tokens["annotator"])}).status_code == 403
    # Nor may an annotator accept their own label by writing the status themselves.
    self_accept = client.put(f"{FEATURE}/3/label", json={"description": "x", "status": "accepted"},
                             headers={**seen, **_bearer(tokens["annotator"])})
    assert self_accept.status_code == 403
    assert self_accept.json()["error"]["message"].startswith("status: accepted")
    assert client.post(review, json={"status": "accepted"},
                       headers={**seen, **_bearer(tokens["reviewer"])}).status_code == 200
    mine = client.put(f"{FEATURE}/4/label", json={"description": "r", "status": "accepted"},
                      headers={"If-None-Match": "*", **_bearer(tokens["reviewer"])})
    assert mine.status_code == 201
    queue = f"/api/v1/saes/{SAE_ID}/queue/next?mode=review"
    assert client.post(queue, headers=_bearer(tokens["annotator"])).status_code == 403
    assert client.post(queue, headers=_bearer(tokens["reviewer"])).status_code in (200, 204)
    assert client.get("/api/v1/labels/export",
                      headers=_bearer(tokens["reviewer"])).status_code == 403
    exported = client.get("/api/v1/labels/export", headers=_bearer(tokens["admin"]))
    assert exported.status_code == 200 and "annotator1" in exported.text


def test_import_is_all_or_nothing_and_export_round_trips(client):
    _put(client, 3, "three", **{"If-None-Match": "*"})
    text = client.get("/api/v1/labels/export").text
    good = '{"sae_id": "s", "feature_index": 1, "author": "ann", "description": "ok"}'
    bad = '{"sae_id": "s", "feature_index": "x", "author": "ann", "description": "no"}'
    r = client.post("/api/v1/labels/import", content=f"{good}\n{bad}\n",
                    headers={"content-type": "text/plain"})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("line 2:")
    assert client.get("/api/v1/labels/search", params={"q": "ok"}).json()["data"] == []
    assert client.get("/api/v1/labels/export").text == text
    r = client.post("/api/v1/labels/import", content=good, headers={"content-type": "text/plain"})
    assert r.json() == {"imported": 1}


def test_nul_in_ids_and_text_is_422(client):
    assert client.get("/api/v1/saes/a%00b/features/1/label").status_code == 422
    assert client.get("/api/v1/labels/search", params={"tag": "a\x00"}).status_code == 422
    r = client.put(f"{FEATURE}/3/label", json={"description": "a\x00b"},
                   headers={"If-None-Match": "*"})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("description")


def test_405_lists_every_method_of_the_path(client):
    r = client.request("OPTIONS", f"{FEATURE}/3/label")
    assert r.status_code == 405
    assert r.headers["allow"] == "DELETE, GET, PUT"
