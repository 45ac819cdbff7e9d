"""Scoring a label in a server with a real model (tiny-llama and a random TopK SAE, a real build):
the windows at zero are the ones `saescope explain` draws (the same scores from a direct call),
and the loaded model itself answers as the scorer, on the model worker."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from app.engine import chat
from app.main import create_app
from app.pipeline.autointerp.backends import ChatOptions
from app.pipeline.autointerp.explain_job import control_explanation
from app.pipeline.autointerp.negatives import pool_from_store
from app.pipeline.autointerp.scoring import ScoringOptions, score_explanation
from app.server_scoring import POOL_SEED, POOL_SEQUENCES, EngineChat, ServerLabelScorer
from app.settings import Settings
from app.store import queries
from app.store.db import make_engine, read_session
from tests.factories import engine_ready, tiny_word_build
from tests.pipeline.autointerp.scripted import KeywordScorer

SAE_ID = "tiny"
HOOK = "blocks.2.hook_resid_post"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", ";", "def", "add",
         "(", ",", ")", ":", "return", "+", "class", "Counter", "model", "feature", "sparse"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("scored")
    url = tiny_word_build(root, WORDS, sae_id=SAE_ID, hook=HOOK)
    settings = Settings(home=root, database_url=url, load_model=True)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        engine_ready(client.app)
        yield client, url, root


def _alive(url: str) -> list[int]:
    engine = make_engine(url)
    with read_session(engine) as session:
        run_id = queries.sae_weights(session=session, sae_id=SAE_ID).run_id
        alive = queries.alive_features(session=session, run_id=run_id)
    engine.dispose()
    return alive


def _label(client: TestClient, index: int, text: str) -> dict:
    r = client.put(f"/api/v1/saes/{SAE_ID}/features/{index}/label",
                   json={"description": text}, headers={"If-None-Match": "*"})
    assert r.status_code == 201, r.text
    return r.json()


def test_the_server_draws_the_windows_explain_draws(served) -> None:
    client, url, root = served
    index = _alive(url)[0]
    with_keyword = ServerLabelScorer(db=client.app.state.db_engine,
                                     engine_state=client.app.state.engine_state,
                                     worker=client.app.state.model_worker,
                                     home=client.app.state.settings.home,
                                     backend=lambda **_: KeywordScorer())
    text = "fires on 'the', ' fox'"
    label = _label(client, index, text)
    saved, client.app.state.label_scorer = client.app.state.label_scorer, with_keyword
    try:
        r = client.post(f"/api/v1/saes/{SAE_ID}/features/{index}/labels/{label['id']}/score")
    finally:
        client.app.state.label_scorer = saved
    assert r.status_code == 200, r.text
    got = {s["method"]: s for s in r.json()["scores"]}
    assert set(got) == {"detection", "fuzzing"}
    # The same scorer, called directly with the pool `saescope explain` builds (its own model
    # load and encode): the same windows, so the same answers.
    engine = make_engine(url)
    pool = pool_from_store(engine, sae_id=SAE_ID, n_sequences=POOL_SEQUENCES, seed=POOL_SEED,
                           cache_dir=root / "cache")
    with read_session(engine) as session:
        feature = queries.get_feature(session=session, sae_id=SAE_ID, index=index)
        control = control_explanation(session, feature=feature, alive=_alive(url), seed=0)
    engine.dispose()
    for method, stored in got.items():
        direct = score_explanation(feature, text, method=method, scorer=KeywordScorer(), seed=0,
                                   control=control, negatives=pool)
        assert (stored["score"], stored["control_score"], stored["n_windows"]) == (
            direct.score, direct.control_score, direct.n_windows), method
        assert stored["details"] == direct.details
    assert got["detection"]["details"]["n_false"] > 0  # windows at zero were found


def test_the_loaded_model_scores_through_the_worker(served) -> None:
    client, url, _ = served
    index = _alive(url)[1]
    label = _label(client, index, "Python keywords such as def and return")
    url = f"/api/v1/saes/{SAE_ID}/features/{index}/labels/{label['id']}/score"
    # Ten windows per prompt do not fit in tiny-llama's 512 positions: a clear 409.
    too_long = client.post(url, json={"methods": ["fuzzing"]})
    assert too_long.status_code == 409, too_long.text
    assert "tiny-llama cannot answer the scorer's prompt" in too_long.json()["error"]["message"]
    app = client.app
    default, app.state.label_scorer = app.state.label_scorer, ServerLabelScorer(
        db=app.state.db_engine, engine_state=app.state.engine_state,
        worker=app.state.model_worker, home=app.state.settings.home,
        options=ScoringOptions(batch_size=1, answer_tokens=8))
    try:
        r = client.post(url, json={"methods": ["detection", "fuzzing"], "seed": 3})
    finally:
        app.state.label_scorer = default
    assert r.status_code == 200, r.text
    scores = {s["method"]: s for s in r.json()["scores"]}
    for method, s in scores.items():
        # A random tiny model answers at random or not at all: the score is whatever it is,
        # but every window (one per prompt here) was one completion by the loaded model.
        assert (s["scorer"], s["seed"]) == ("local:tiny-llama", 3), method
        assert s["n_windows"] > 0 and s["details"]["batches"] == s["n_windows"]
        assert s["score"] is not None and 0.0 <= s["score"] <= 1.0
    assert client.app.state.model_worker.pending == 0
    # The model still answers text search afterwards.
    assert client.post(f"/api/v1/saes/{SAE_ID}/search", json={"text": "the fox"}).status_code \
        == 200


class CountingWorker:
    """The app's model worker, counting the streams asked of it."""

    def __init__(self, worker) -> None:  # noqa: ANN001 - a ModelWorker
        self.worker = worker
        self.streams = 0

    def stream(self, steps):  # noqa: ANN001, ANN201
        self.streams += 1
        return self.worker.stream(steps)


def test_the_scorer_asks_the_engine_chat_not_the_steering_generator(served, monkeypatch) -> None:
    client, _, _ = served
    service = client.app.state.engine_state.service

    def no_steering(**_):  # noqa: ANN003, ANN202
        raise AssertionError("a scorer's reply ran the steering generator")

    monkeypatch.setattr(service, "steer_stream", no_steering)
    worker = CountingWorker(client.app.state.model_worker)
    messages = [{"role": "system", "content": "Answer with the window numbers."},
                {"role": "user", "content": "Description: def and return.\n1. the fox\n2. def"}]
    options = ChatOptions(max_tokens=12, temperature=1.0, seed=5)

    async def ask(options: ChatOptions) -> str:
        # As ServerLabelScorer runs it: score_label in a thread, each reply on the app's loop.
        scorer = EngineChat(service=service, worker=worker, loop=asyncio.get_running_loop(),
                            sae_id=SAE_ID, stop=threading.Event())
        return await asyncio.to_thread(scorer.complete, messages, options)

    got = client.portal.call(ask, options)
    assert worker.streams == 1  # one stream on the model worker for one reply
    # The engine's chat reply, the one the local backend and /v1/chat/completions give.
    with torch.inference_mode():
        direct = chat.reply(service.lm, messages, max_new_tokens=12, temperature=1.0, seed=5)
    assert got == direct["text"]
    assert direct["completion_tokens"] > 0
    # A scorer's options (the reply started with "[", stopped at "]") reach the engine.
    stop = direct["text"].strip()[-1]
    listed = ChatOptions(max_tokens=12, temperature=1.0, seed=5, stop=(stop,), reply_start="[")
    with torch.inference_mode():
        direct = chat.reply(service.lm, messages, max_new_tokens=12, temperature=1.0, seed=5,
                            stop=(stop,), reply_start="[")
    assert client.portal.call(ask, listed) == "[" + direct["text"]
