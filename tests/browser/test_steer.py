"""The steering lab in Debian's Chromium: from a feature page, steer, watch both columns fill
while the test releases the model one step at a time (no sleeps), save the run and open its
URL; a sweep draws its grid and chart.

The server runs in this process (uvicorn on a thread, over the session's built database), so
the test can hold the model between steps.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from app.engine.generate import IncrementalText
from app.engine.tiny import build_tiny
from app.main import create_app
from app.pipeline.demo_steering import DEMO_AUTHOR
from app.settings import Settings
from app.store.db import make_engine, write_session
from app.store.steering import save_run
from tests.browser.conftest import ARTIFACTS
from tests.live_server import MODEL_ID, SAE_ID

pytestmark = pytest.mark.browser

PROMPT = "Once upon a time the quick brown fox"
MAX_NEW = 16
WAIT = 60


class SteppedService:
    """The real service, with each step of a streamed generation held until the test releases
    it; everything else passes through."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.permits = threading.Semaphore(0)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def steer_stream(self, **kwargs):
        steps = self.inner.steer_stream(**kwargs)
        while True:
            assert self.permits.acquire(timeout=WAIT), "the test never released a step"
            try:
                item = next(steps)
            except StopIteration:
                return
            yield item


@pytest.fixture(scope="module")
def lab(server, tmp_path_factory) -> Iterator[tuple[str, object]]:
    """(url, app) of an in-process server over the built database."""
    import socket

    import uvicorn

    home = tmp_path_factory.mktemp("steer-lab")
    app = create_app(Settings(home=home, database_url=server.db_url, model=MODEL_ID,
                              steer_max_new_tokens=64))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        # The model loads on the model thread ahead of any job: this runs once it has.
        while not uv.started:
            if not thread.is_alive():
                raise RuntimeError("the lab server did not start")
            threading.Event().wait(0.05)
        app.state.model_worker.submit(lambda: None).result(WAIT * 3)
        assert app.state.engine_state.status == "ready", app.state.engine_state.message
        yield f"http://127.0.0.1:{port}", app
    finally:
        uv.should_exit = True
        thread.join(10)


@pytest.fixture
def lab_page(browser, lab):
    url, _ = lab
    context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=url)
    page = context.new_page()
    problems: list[str] = []
    page.on("dialog", lambda d: (problems.append(d.message), d.dismiss()))
    page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}")
            if msg.type == "error" and "404" not in msg.text else None)
    # Content-Security-Policy violations (the lab runs under the pages' strict policy).
    page.add_init_script("window.__csp = []; document.addEventListener("
                         "'securitypolicyviolation', e => window.__csp.push(e.violatedDirective));")
    page.set_default_timeout(30_000)
    yield page
    context.close()
    assert problems == []


def _steps_until_both_show_text(server, value: float, index: int) -> int:
    """Forwards after which both streams have shown some text (a first token may hold only part
    of a character), from the same greedy request run whole beforehand."""
    _, out = server.post_json("/api/v1/steer", {
        "sae_id": SAE_ID, "prompt": PROMPT, "max_new_tokens": MAX_NEW,
        "features": [{"index": index, "mode": "add", "value": value}]})
    decode = build_tiny(MODEL_ID).decode
    needed = 0
    for which in ("default", "steered"):
        text = IncrementalText(decode)
        first = next(i for i, t in enumerate(out[which]["token_ids"]) if text.push(t))
        needed = max(needed, first + 1)
    assert needed < min(len(out[w]["token_ids"]) for w in ("default", "steered")), out
    return needed


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.mouse.move(0, 0)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_steer_from_a_feature_page_stream_save_and_sweep(lab_page, lab, server) -> None:
    page = lab_page
    _, app = lab
    index = server.get_json(f"/api/v1/saes/{SAE_ID}/features?filter=alive&per_page=1")[
        "data"][0]["index"]
    value = 40.0
    needed = _steps_until_both_show_text(server, value, index)

    page.goto(f"/{MODEL_ID}/{SAE_ID}/{index}")
    page.click("[data-steer-link]")
    page.wait_for_url("**/steer?**")
    row = page.locator("#steer-features tbody tr")
    assert row.count() == 1 and f"#{index}" in row.inner_text()
    page.fill("#steer-prompt", PROMPT)
    page.fill("#steer-max-new", str(MAX_NEW))
    page.fill("[data-feature-value='0']", str(value))

    stepped = SteppedService(app.state.engine_state.service)
    app.state.engine_state.service = stepped
    try:
        page.click("#steer-go")
        for _ in range(needed):
            stepped.permits.release()
        page.wait_for_function("() => ['steer-default', 'steer-steered'].every("
                               "id => document.getElementById(id).textContent.length > 0)")
        # Partial text while the stream is open: the model has not been let past this step.
        assert page.get_attribute("[data-steer-lab]", "data-state") == "streaming"
        partial = page.inner_text("#steer-steered")
        _shot(page, "steer-streaming")
        for _ in range(MAX_NEW + 1):
            stepped.permits.release()
        page.wait_for_selector("[data-steer-lab][data-state=done]")
    finally:
        app.state.engine_state.service = stepped.inner
        for _ in range(MAX_NEW + 1):
            stepped.permits.release()
    default_text = page.inner_text("#steer-default")
    steered_text = page.inner_text("#steer-steered")
    assert steered_text.startswith(partial) and len(steered_text) >= len(partial)
    assert "tokens" in page.inner_text("#steer-steered-meta")
    _shot(page, "steer-done")

    page.fill("#steer-run-name", "fox, steered")
    page.click("#steer-save-btn")
    link = page.locator("#steer-run-link")
    link.wait_for(state="visible")
    href = link.get_attribute("href")
    page.goto(href)
    assert page.inner_text("h1").startswith("fox, steered")
    assert page.inner_text("#run-default") == default_text
    assert page.inner_text("#run-steered") == steered_text
    _shot(page, "steer-run")

    page.click("text=open in the lab")
    page.wait_for_url("**/steer?run=**")
    assert page.input_value("#steer-prompt") == PROMPT
    page.fill("#steer-max-new", "8")
    page.fill("#steer-sweep-values", "0, 10, 40, 120")
    page.click("#steer-sweep-go")
    page.wait_for_selector("#steer-sweep-plot[data-rendered=yes]", timeout=120_000)
    assert page.locator("#steer-sweep-grid tbody tr").count() == 5  # default + 4 values
    traces = page.evaluate("document.getElementById('steer-sweep-plot').data.length")
    assert traces == 2
    assert page.evaluate("window.__csp") == []
    _shot(page, "steer-sweep")

    # A contrastive vector from two sets of prompts, with its aligned features linked.
    page.fill("#steer-vector-positive", "Once upon a time\nthe quick brown fox")
    page.fill("#steer-vector-negative", "def scale(x, y):\nreturn x * 2 + y")
    page.fill("#steer-vector-name", "story-vs-code")
    page.click("#steer-vector-go")
    aligned = page.locator("#steer-vector-aligned tbody tr")
    aligned.first.wait_for()
    assert aligned.count() == 10
    href = aligned.first.locator("a").get_attribute("href")
    assert href.startswith(f"/{MODEL_ID}/{SAE_ID}/")
    assert page.input_value("#steer-vector-pick") == "story-vs-code"


def test_only_a_runs_author_is_offered_its_delete(lab_page, lab, server) -> None:
    """The server lets only a run's author delete it: the demo's runs (by 'saescope demo')
    show no delete button to the local admin, whose own run has one that works."""
    page = lab_page
    request = {"sae_id": SAE_ID, "prompt": PROMPT, "max_new_tokens": 4}
    engine = make_engine(server.db_url)
    try:
        with write_session(engine) as session:
            demo = save_run(session=session, name="a demo run", sae_id=SAE_ID, request=request,
                            default_text="d", steered_text="s", author=DEMO_AUTHOR)
    finally:
        engine.dispose()
    status, mine = server.post_json("/api/v1/steer/runs", {
        "name": "my run", "request": request, "default_text": "d", "steered_text": "s"})
    assert status == 201 and mine["author"] == "local"
    page.goto(f"/steer?sae={SAE_ID}")
    theirs = page.locator("#steer-runs li", has_text="a demo run")
    own = page.locator("#steer-runs li", has_text="my run")
    own.wait_for()
    assert theirs.locator("button").count() == 0
    _shot(page, "steer-runs-delete")
    own.locator(f"[data-delete-run='{mine['id']}']").click()
    own.wait_for(state="detached")
    assert theirs.count() == 1 and page.inner_text("#steer-status") == ""
    assert server.get_json(f"/api/v1/steer/runs/{demo.id}")["author"] == DEMO_AUTHOR
