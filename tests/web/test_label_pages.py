"""Labeling pages: sign-in / sign-out with an HTTP-only session cookie, pages closed to signed-out
browsers under auth=token, the queue page, label search, and hostile labels shown literally."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape

from app.main import create_app
from app.settings import Settings
from app.store.db import make_engine
from app.store.users import add_user, set_disabled
from tests.factories import synthetic_database, synthetic_run

MODEL_ID = "tiny-llama"
SAE_ID = "1-res-topk-64"
HTML = {"Accept": "text/html"}
HOSTILE = [
    "<script>alert(1)</script>", '" onmouseover="alert(1)', "javascript:alert(1)",
    "{{ 7*7 }} {% raw %}", "\u202eevil reversed\u202c", "w" * 1000,
]


@pytest.fixture
def db_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'labels.db'}"
    synthetic_database(url, synthetic_run(d_sae=16, n_dead=0, seed=4), labels=[
        {"sae_id": SAE_ID, "index": i, "description": text, "tags": ["hostile"],
         "notes": text} for i, text in enumerate(HOSTILE)
    ])
    return url


@pytest.fixture
def open_client(db_url, tmp_path) -> Iterator[TestClient]:
    settings = Settings(home=tmp_path, database_url=db_url, load_model=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def test_hostile_labels_render_escaped_and_isolated(open_client) -> None:
    pages = [
        open_client.get(f"/{MODEL_ID}/{SAE_ID}", headers=HTML).text,
        open_client.get("/labels/search", params={"tag": "hostile"}, headers=HTML).text,
        *(open_client.get(f"/{MODEL_ID}/{SAE_ID}/{i}", headers=HTML).text
          for i in range(len(HOSTILE))),
    ]
    for text in HOSTILE[:2]:
        assert all(text not in page for page in pages)
    overview, search = pages[0], pages[1]
    for text in HOSTILE:
        assert str(escape(text)) in search
    assert '<bdi class="label">&lt;script&gt;alert(1)&lt;/script&gt;</bdi>' in overview
    assert "{{ 7*7 }}" in search  # template syntax is text, not evaluated


def test_queue_and_search_pages(open_client) -> None:
    queue = open_client.get(f"/{MODEL_ID}/{SAE_ID}/queue", headers=HTML)
    assert queue.status_code == 200
    assert 'data-queue' in queue.text and "js/queue.js" in queue.text
    assert "<script>" not in queue.text.replace('<script type="module"', "")
    overview = open_client.get(f"/{MODEL_ID}/{SAE_ID}", headers=HTML).text
    assert f"/{MODEL_ID}/{SAE_ID}/queue" in overview and 'action="/labels/search"' in overview
    hits = open_client.get("/labels/search", params={"q": "evil"}, headers=HTML).text
    assert f'href="/{MODEL_ID}/{SAE_ID}/4"' in hits


@pytest.fixture
def token_client(db_url, tmp_path) -> Iterator[tuple[TestClient, str]]:
    engine = make_engine(db_url)
    _, token = add_user(engine, name="ann", role="annotator")
    engine.dispose()
    settings = Settings(home=tmp_path, database_url=db_url, load_model=False, auth="token",
                        secret_key="k" * 40, session_hours=1)
    with TestClient(create_app(settings), raise_server_exceptions=False,
                    follow_redirects=False) as c:
        yield c, token


def test_sign_in_and_out(token_client, db_url) -> None:
    client, token = token_client
    page = f"/{MODEL_ID}/{SAE_ID}"
    r = client.get(page, headers=HTML)
    assert r.status_code == 303 and r.headers["location"].startswith("/sign-in?next=")
    assert client.get("/sign-in", headers=HTML).status_code == 200
    bad = client.post("/sign-in", data={"token": "sst_wrong", "next": page})
    assert bad.status_code == 303 and "error" in bad.headers["location"]
    evil = client.post("/sign-in", data={"token": token, "next": "//evil.example/"})
    assert evil.headers["location"] == "/"  # no open redirect
    client.cookies.clear()
    good = client.post("/sign-in", data={"token": token, "next": page})
    assert (good.status_code, good.headers["location"]) == (303, page)
    cookie = good.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "max-age=3600" in cookie
    assert client.get(page, headers=HTML).status_code == 200
    # The session works for the API too, as ann.
    made = client.put(f"/api/v1/saes/{SAE_ID}/features/9/label", json={"description": "x"},
                      headers={"If-None-Match": "*", "Sec-Fetch-Site": "same-origin"})
    assert (made.status_code, made.json()["author"]) == (201, "ann")
    stolen = dict(client.cookies)
    assert client.post("/sign-out").status_code == 303
    client.cookies.update(stolen)  # a copy of the cookie is dead after sign-out
    assert client.get(page, headers=HTML).status_code == 303
    # A forged cookie (bad signature) is ignored; a disabled user's sessions end.
    client.cookies.set("saescope_session", "abc.def")
    assert client.get(page, headers=HTML).status_code == 303
    client.cookies.clear()
    client.post("/sign-in", data={"token": token, "next": page})
    engine = make_engine(db_url)
    set_disabled(engine, name="ann")
    engine.dispose()
    assert client.get(page, headers=HTML).status_code == 303


def test_sign_in_page_errors_whoami_and_expiry(token_client, db_url) -> None:
    from sqlalchemy import update

    from app.store.db import write_session
    from app.store.tables import AuthSession, utcnow

    client, token = token_client
    page = f"/{MODEL_ID}/{SAE_ID}"
    spoof = client.get("/sign-in", params={"error": "Session over: call +1 555 0100"},
                       headers=HTML)
    assert "555" not in spoof.text  # a link cannot put its own words on the page
    bad = client.post("/sign-in", data={"token": "sst_wrong", "next": page})
    assert "unknown or disabled token" in client.get(bad.headers["location"], headers=HTML).text
    client.post("/sign-in", data={"token": token, "next": page})
    signed_in = client.get(page, headers=HTML).text
    assert "<bdi>ann</bdi> · annotator" in signed_in and 'action="/sign-out"' in signed_in
    assert 'data-role="annotator"' in signed_in
    # The session row's expiry is the server's: past it, the cookie no longer signs anyone in.
    engine = make_engine(db_url)
    with write_session(engine) as session:
        session.execute(update(AuthSession).values(expires_at=utcnow()))
    engine.dispose()
    assert client.get(page, headers=HTML).status_code == 303
