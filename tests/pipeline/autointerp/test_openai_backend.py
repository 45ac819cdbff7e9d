"""The openai backend against saescope's own /v1/chat/completions over real HTTP (a uvicorn
server with tiny-llama, tests/live_server.py: one saescope explaining for another), and the
one-line errors for what retrying cannot fix: an unreachable URL, a refused key (a server with
auth=token), an unknown model, an answer that is not JSON. A small stdlib HTTP server stands in
for a misbehaving endpoint (5xx then HTML), which saescope itself never is."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from app.errors import ConfigError
from app.pipeline.autointerp.backends import ChatOptions
from app.pipeline.autointerp.feature_data import FeatureData, Window
from app.pipeline.autointerp.llm_explainer import ExplainOptions, explain_messages, llm_explain
from app.pipeline.autointerp.openai_backend import ChatEndpointError, OpenAIBackend, chat_url
from app.pipeline.autointerp.usage import TokenBudgetExceeded
from app.store.db import make_engine, upgrade
from app.store.users import add_user
from tests.live_server import MODEL_ID, Server, chat_server, free_port

SECRET = "k" * 40
ASK = [{"role": "user", "content": "Describe the fox."}]
GREEDY = ChatOptions(max_tokens=6, temperature=0.0, seed=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with chat_server(tmp_path_factory.mktemp("chat")) as srv:
        yield srv


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    root = tmp_path_factory.mktemp("chat-token")
    url = f"sqlite:///{root / 'chat.db'}"
    upgrade(url)
    engine = make_engine(url)
    _, token = add_user(engine, name="explainer", role="viewer")
    engine.dispose()
    with chat_server(root, SAESCOPE_AUTH="token", SAESCOPE_SECRET_KEY=SECRET) as srv:
        yield srv, token


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def test_chat_urls():
    assert chat_url("http://h:8080") == "http://h:8080/v1/chat/completions"
    assert chat_url("http://h:8080/v1/") == "http://h:8080/v1/chat/completions"
    assert chat_url("https://h/api/v1/chat/completions") == "https://h/api/v1/chat/completions"
    for bad in ("localhost:8080", "ftp://h/v1", "http:///v1"):
        with pytest.raises(ConfigError, match="must start with http"):
            chat_url(bad)
    with pytest.raises(ConfigError, match="needs the endpoint's URL"):
        OpenAIBackend(model="m")


def test_one_saescope_explains_for_another(server):
    with OpenAIBackend(f"{server.url}/v1", MODEL_ID) as backend:
        assert backend.name == f"openai:{MODEL_ID}"
        direct = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": MODEL_ID, "messages": ASK, "max_tokens": 6, "temperature": 0,
            "seed": 1}).json()
        assert backend.complete(ASK, GREEDY) == direct["choices"][0]["message"]["content"]
        assert backend.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
        assert backend.usage.completion_tokens == direct["usage"]["completion_tokens"]
        feature = FeatureData(sae_id="s", index=1, top=(
            Window.of([" the", " fox"], [0.0, 3.0]),))
        description = llm_explain(feature, backend, ExplainOptions(
            few_shot=False, chat=ChatOptions(max_tokens=8)))
        assert isinstance(description, str) and "\n" not in description
        assert backend.usage.requests == 2
        # Over tiny-llama's 511 positions: the server's 400 (context_length_exceeded), then the
        # explainer asks again with a shorter prompt.
        long = FeatureData(sae_id="s", index=2, top=tuple(
            Window.of([f" w{i}" for i in range(40)], [0.0] * 30 + [2.0] + [0.0] * 9)
            for _ in range(10)))
        with pytest.raises(ChatEndpointError) as err:
            backend.complete(explain_messages(long, ExplainOptions()), GREEDY)
        assert err.value.code == "context_length_exceeded"
        assert "\n" not in llm_explain(long, backend, ExplainOptions(chat=GREEDY))


def test_many_prompts_with_several_workers_keep_their_order(server):
    prompts = [[{"role": "user", "content": f"Number {i}: what comes next?"}] for i in range(6)]
    with OpenAIBackend(f"{server.url}/v1", MODEL_ID) as backend:
        one_by_one = [backend.complete(p, GREEDY) for p in prompts]
        assert len(set(one_by_one)) > 1  # the prompts really get different answers
        assert backend.complete_many(prompts, GREEDY, workers=3) == one_by_one
        assert backend.usage.requests == 12


def test_the_model_defaults_to_the_servers_only_one(server):
    with OpenAIBackend(server.url) as backend:
        assert backend.model == MODEL_ID


def test_token_budget_stops_further_requests(server):
    with OpenAIBackend(f"{server.url}/v1", MODEL_ID, max_total_tokens=10) as backend:
        backend.complete(ASK, GREEDY)
        assert backend.usage.total_tokens > 10
        with pytest.raises(TokenBudgetExceeded, match="token budget is used up"):
            backend.complete(ASK, GREEDY)
        assert backend.usage.requests == 1


def test_unknown_model_and_path_are_one_line_errors(server):
    with OpenAIBackend(f"{server.url}/v1", "gpt-9") as backend, \
            pytest.raises(ChatEndpointError) as err:
        backend.complete(ASK, GREEDY)
    message = one_line(err)
    assert "404" in message and "gpt-9" in message and "model" in message
    with OpenAIBackend(f"{server.url}/nope", MODEL_ID) as backend, \
            pytest.raises(ChatEndpointError, match="404") as err:
        backend.complete(ASK, GREEDY)
    assert "URL" in one_line(err)


def test_unreachable_url_is_a_one_line_error_after_bounded_retries():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with OpenAIBackend(url, MODEL_ID, retries=2, backoff_s=0) as backend, \
            pytest.raises(ChatEndpointError) as err:
        backend.check()
    message = one_line(err)
    assert "cannot reach" in message and "after 3 tries" in message
    assert "--explainer-url" in message


def test_bad_or_missing_key_is_a_one_line_error(token_server, monkeypatch):
    server, token = token_server
    monkeypatch.setenv("SAESCOPE_TEST_KEY", "wrong")
    with OpenAIBackend(f"{server.url}/v1", MODEL_ID, "SAESCOPE_TEST_KEY") as backend, \
            pytest.raises(ChatEndpointError) as err:
        backend.complete(ASK, GREEDY)
    message = one_line(err)
    assert "refused the API key (401" in message and "$SAESCOPE_TEST_KEY" in message
    monkeypatch.delenv("SAESCOPE_TEST_KEY")
    with OpenAIBackend(f"{server.url}/v1", MODEL_ID, "SAESCOPE_TEST_KEY") as backend, \
            pytest.raises(ChatEndpointError, match=r"\$SAESCOPE_TEST_KEY is not set"):
        backend.complete(ASK, GREEDY)
    monkeypatch.setenv("SAESCOPE_TEST_KEY", token)
    with OpenAIBackend(f"{server.url}/v1", MODEL_ID, "SAESCOPE_TEST_KEY") as backend:
        assert isinstance(backend.complete(ASK, GREEDY), str)


class Misbehaving(BaseHTTPRequestHandler):
    """Answers 503 to the first `failures` requests, then 200 with an HTML page."""

    failures = 2
    seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        Misbehaving.seen.append(self.path)
        failing = len(Misbehaving.seen) <= Misbehaving.failures
        body = b"busy" if failing else b"<html><body>Welcome to nginx!</body></html>"
        self.send_response(503 if failing else 200)
        self.send_header("Content-Type", "text/plain" if failing else "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def misbehaving() -> Iterator[str]:
    Misbehaving.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_5xx_are_retried_then_html_is_a_one_line_error(misbehaving):
    with OpenAIBackend(misbehaving, "m", retries=3, backoff_s=0) as backend, \
            pytest.raises(ChatEndpointError) as err:
        backend.complete(ASK, GREEDY)
    assert Misbehaving.seen == ["/v1/chat/completions"] * 3  # two 503s, then the page
    message = one_line(err)
    assert "did not answer JSON (text/html" in message and "OpenAI-compatible" in message


def test_5xx_past_the_retries_is_a_one_line_error(misbehaving):
    with OpenAIBackend(misbehaving, "m", retries=1, backoff_s=0) as backend, \
            pytest.raises(ChatEndpointError) as err:
        backend.complete(ASK, GREEDY)
    assert len(Misbehaving.seen) == 2
    assert "answered 503 after 2 tries: busy" in one_line(err)


def test_a_stop_string_cuts_the_reply_before_it_remote_and_local(server):
    from app.engine.tiny import build_tiny
    from app.pipeline.autointerp.local_backend import LocalBackend

    local = LocalBackend.from_model(build_tiny(MODEL_ID))
    wide = ChatOptions(max_tokens=12, temperature=0.0, seed=1)
    with OpenAIBackend(f"{server.url}/v1", MODEL_ID) as backend:
        full = backend.complete(ASK, wide)
        assert local.complete(ASK, wide) == full  # the same model on both sides
        stop = full.strip()[len(full.strip()) // 2]  # a character the reply really holds
        expected = full[:full.index(stop)]
        cut = ChatOptions(max_tokens=12, temperature=0.0, seed=1, stop=(stop,))
        assert backend.complete(ASK, cut) == expected
        assert local.complete(ASK, cut) == expected
