"""POST .../labels/{id}/score: roles, bad input, one label at a time, a label edited while it is
scored, no model; the scores stored and shown (labels, feature JSON with its drafts and ETag).

The server's scorer (app/server_scoring.py) runs here with a scripted chat backend and a model
service that loads nothing (fuzzing needs no model); tests/api/test_label_score_model.py runs it
on a real tiny model, detection included.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from app.api.model_service import EngineState
from app.api.schemas import FeatureOut
from app.main import create_app
from app.server_scoring import ServerLabelScorer
from app.settings import Settings
from app.store import labels as store
from app.store.db import make_engine, read_session
from app.store.users import add_user
from tests.api.conftest import SAE_ID
from tests.api.test_read_api import _assert_exact_shape, assert_error
from tests.pipeline.autointerp.scripted import KeywordScorer

FEATURE = f"/api/v1/saes/{SAE_ID}/features"
SECRET = "s" * 40


class NoModel:
    """A model service that loaded no SAE: fuzzing runs, detection cannot."""

    model_id = "tiny-llama"
    saes: dict = {}
    skipped = {SAE_ID: "its folder /nowhere/sae does not exist"}


def _scripted(app, backend=None) -> None:  # noqa: ANN001
    """The app's real scorer, with a ready model state and a scripted chat backend."""
    app.state.label_scorer = ServerLabelScorer(
        db=app.state.db_engine, engine_state=EngineState(status="ready", service=NoModel()),
        worker=app.state.model_worker, home=app.state.settings.home,
        backend=backend or (lambda **_: KeywordScorer()))


def _without_time(scores: list[dict]) -> list[dict]:
    """Scores without created_at (the feature JSON writes +00:00 where pydantic writes Z)."""
    return [{k: v for k, v in s.items() if k != "created_at"} for s in scores]


def _label_id(db_url: str, index: int, author: str = "ann") -> int:
    engine = make_engine(db_url)
    try:
        with read_session(engine) as session:
            return store.own_label(session=session, sae_id=SAE_ID, index=index,
                                   author=author).id
    finally:
        engine.dispose()


@pytest.fixture
def token_app(records, db_url, tmp_path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    engine = make_engine(db_url)
    tokens = {role: add_user(engine, name=f"{role}1", role=role)[1]
              for role in ("viewer", "annotator", "reviewer")}
    engine.dispose()
    settings = Settings(home=tmp_path, database_url=db_url, load_model=False, auth="token",
                        secret_key=SECRET)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        _scripted(c.app)
        yield c, {role: {"Authorization": f"Bearer {t}"} for role, t in tokens.items()}


@pytest.fixture
def scripted(client) -> TestClient:
    _scripted(client.app)
    return client


def test_annotators_score_and_the_scores_are_shown(token_app, db_url) -> None:
    client, auth = token_app
    label_id = _label_id(db_url, 4)
    url = f"{FEATURE}/4/labels/{label_id}/score"
    body = {"methods": ["fuzzing"]}
    tag = client.get(f"{FEATURE}/4", headers=auth["viewer"]).headers["etag"]
    assert_error(client.post(url, json=body), 401)
    assert_error(client.post(url, json=body, headers=auth["viewer"]), 403, "annotator")
    assert_error(client.post(url, json=body, headers={**auth["annotator"],
                                                      "Sec-Fetch-Site": "cross-site"}), 403)
    done = client.post(url, json=body, headers=auth["annotator"])
    assert done.status_code == 200, done.text
    scored = done.json()
    assert (scored["id"], scored["description"]) == (label_id, "digits")
    (score,) = scored["scores"]
    assert (score["method"], score["scorer"], score["seed"], score["label_version"]) == (
        "fuzzing", "keyword", 0, 1)
    assert score["n_windows"] == score["details"]["n_true"] + score["details"]["n_false"] > 0
    assert 0.0 <= score["score"] <= 1.0 and score["control_score"] is not None
    assert score["details"]["control"]["source"].startswith("pattern explanation of feature")
    # Stored: the feature's labels and its JSON (a new ETag) show it.
    labels = client.get(f"{FEATURE}/4/labels", headers=auth["viewer"]).json()["data"]
    assert labels[0]["scores"] == scored["scores"]
    feature = client.get(f"{FEATURE}/4", headers=auth["viewer"])
    assert feature.headers["etag"] != tag
    assert _without_time(feature.json()["label"]["scores"]) == _without_time(scored["scores"])
    assert feature.json()["label"]["id"] == label_id


@pytest.mark.parametrize(("path", "body", "status", "fragment"), [
    ("/4/labels/999/score", {}, 404, "no label 999"),
    ("/5/labels/{id}/score", {}, 404, "no label"),  # another feature's label
    ("/4/labels/0/score", {}, 422, "label_id"),
    ("/4/labels/{id}/score", {"methods": ["vibes"]}, 422, "methods"),
    ("/4/labels/{id}/score", {"methods": []}, 422, "methods"),
    ("/4/labels/{id}/score", {"methods": ["fuzzing"] * 3}, 422, "methods"),
    ("/4/labels/{id}/score", {"seed": -1}, 422, "seed"),
    ("/4/labels/{id}/score", {"seed": 0.5}, 422, "seed"),
    ("/4/labels/{id}/score", {"methods": "fuzzing"}, 422, "methods"),
])
def test_bad_requests_are_4xx_saying_what(scripted, db_url, path, body, status,
                                          fragment) -> None:
    url = FEATURE + path.format(id=_label_id(db_url, 4))
    assert_error(scripted.post(url, json=body), status, fragment)


def test_unknown_sae_and_a_label_without_text(scripted, db_url) -> None:
    label_id = _label_id(db_url, 4)
    assert_error(scripted.post(f"/api/v1/saes/nope/features/4/labels/{label_id}/score"), 404)
    empty = scripted.put(f"{FEATURE}/9/label", json={"description": "", "tags": ["todo"]},
                         headers={"If-None-Match": "*"}).json()
    assert_error(scripted.post(f"{FEATURE}/9/labels/{empty['id']}/score"), 409,
                 "no description to score")


def test_detection_needs_the_sae_loaded(scripted, db_url) -> None:
    url = f"{FEATURE}/4/labels/{_label_id(db_url, 4)}/score"
    refused = scripted.post(url)
    assert_error(refused, 409, "has not loaded", "fuzzing only", "does not exist")
    assert "/nowhere/" not in refused.text  # no server path in a public answer


def test_no_model_or_a_loading_one_is_503(client, db_url) -> None:
    url = f"{FEATURE}/4/labels/{_label_id(db_url, 4)}/score"
    assert_error(client.post(url), 503, "needs the server's model", "--no-model")
    client.app.state.engine_state.status = "loading"
    loading = client.post(url)
    assert_error(loading, 503, "still loading")
    assert loading.headers["retry-after"] == "5"


class Blocking(KeywordScorer):
    """Answers like the keyword scorer once `release` is set; says when it was first asked."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.release = threading.Event()

    def complete(self, messages, options):  # noqa: ANN001, ANN201
        self.asked.set()
        assert self.release.wait(30), "the test never released the scorer"
        return super().complete(messages, options)


def test_one_label_at_a_time(records, settings, db_url) -> None:
    app = create_app(settings)
    blocking = Blocking()
    _scripted(app, lambda **_: blocking)
    url = f"{FEATURE}/4/labels/{_label_id(db_url, 4)}/score"

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                first = asyncio.create_task(client.post(url, json={"methods": ["fuzzing"]}))
                assert await asyncio.to_thread(blocking.asked.wait, 30)
                second = await asyncio.wait_for(client.post(url, json={"methods": ["fuzzing"]}),
                                                10)
                assert_error(second, 503, "another label is being scored")
                assert second.headers["retry-after"] == "15"
                blocking.release.set()
                assert (await first).status_code == 200
                again = await client.post(url, json={"methods": ["fuzzing"]})
                assert again.status_code == 200, again.text

    asyncio.run(scenario())


def test_a_label_edited_while_scored_stores_nothing(scripted, db_url) -> None:
    label = scripted.put(f"{FEATURE}/7/label", json={"description": "' value' after 'the'"},
                         headers={"If-None-Match": "*"}).json()

    class EditsFirst(KeywordScorer):
        edited = False

        def complete(self, messages, options):  # noqa: ANN001, ANN201
            if not self.edited:  # someone saves a new text while the scorer reads the old one
                self.edited = True
                engine = make_engine(db_url)
                store.update_label(engine, label_id=label["id"], expected_version=1,
                                   edit=store.LabelEdit(description="something else"),
                                   actor="local")
                engine.dispose()
            return super().complete(messages, options)

    _scripted(scripted.app, lambda **_: EditsFirst())
    r = scripted.post(f"{FEATURE}/7/labels/{label['id']}/score", json={"methods": ["fuzzing"]})
    assert_error(r, 412, "changed meanwhile")
    assert scripted.get(f"{FEATURE}/7/labels").json()["data"][0]["scores"] == []


def test_drafts_and_their_scores_in_the_feature_json(scripted, db_url) -> None:
    engine = make_engine(db_url)
    draft = store.save_explanation(
        engine, sae_id=SAE_ID, index=4, explainer="pattern", description="fires on ' 7'",
        seed=0, run_id=None, scores=[store.ScoreRecord(
            method="detection", scorer="keyword", score=0.75, control_score=0.5, n_windows=40,
            seed=0)]).label
    engine.dispose()
    body = scripted.get(f"{FEATURE}/4").json()
    FeatureOut.model_validate(body)
    _assert_exact_shape(FeatureOut, body, "feature")
    assert body["label"]["description"] == "digits"  # a draft is never the shown label
    (shown,) = body["drafts"]
    assert (shown["id"], shown["explainer"], shown["author"], shown["etag"]) == (
        draft.id, "pattern", "autointerp:pattern", f'"{draft.id}-1"')
    assert [(s["method"], s["score"], s["control_score"], s["n_windows"])
            for s in shown["scores"]] == [("detection", 0.75, 0.5, 40)]
    # Accepted, it is the shown label with its scores, and no longer a draft.
    accepted = scripted.post(f"{FEATURE}/4/labels/{draft.id}/review",
                             json={"status": "accepted"}, headers={"If-Match": shown["etag"]})
    assert accepted.status_code == 200
    body = scripted.get(f"{FEATURE}/4").json()
    assert (body["label"]["description"], body["drafts"]) == ("fires on ' 7'", [])
    assert [s["score"] for s in body["label"]["scores"]] == [0.75]
    _assert_exact_shape(FeatureOut, body, "feature")
