"""The `openai` chat backend: any OpenAI-compatible `/v1/chat/completions` endpoint (llama.cpp's
server, vLLM, Ollama, OpenAI, or another saescope) over httpx.

Server errors (5xx, 429) and connection failures are retried a bounded number of times; what
retrying cannot fix (an unreachable URL, a refused key, an unknown model or path, an answer
that is not JSON) is a ChatEndpointError with one line saying what to change. Tokens used are
counted (`usage`, from the server's answers) against an optional budget, and `complete_many`
sends several conversations at once for remote endpoints.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import httpx

from app.errors import ConfigError
from app.pipeline.autointerp.backends import ChatMessage, ChatOptions
from app.pipeline.autointerp.usage import TokenUsage
from app.settings import read_env

MAX_RETRY_WAIT_S = 30.0


class ChatEndpointError(ConfigError):
    """The endpoint cannot be used as configured; the message says what to change."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code  # OpenAI's error code when the server gave one


def _server_code(response: httpx.Response) -> str | None:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def chat_url(url: str) -> str:
    """The completions URL of a base URL: kept when it ends in /chat/completions, else
    {url}/chat/completions when it ends in /v1, else {url}/v1/chat/completions."""
    base = url.strip().rstrip("/")
    try:
        parsed = httpx.URL(base)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"the chat endpoint URL {url!r} is not valid: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"the chat endpoint URL {url!r} must start with http:// or https:// "
                          "and name a host, e.g. http://127.0.0.1:8080/v1")
    if base.endswith("/chat/completions"):
        return base
    return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"


def _one_line(text: str, limit: int = 200) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _server_message(response: httpx.Response) -> str:
    """What the server said about an error: OpenAI's error.message, or the start of the body."""
    try:
        data = response.json()
    except ValueError:
        return _one_line(response.text) or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error:
            return _one_line(str(error))
    return _one_line(response.text)


class OpenAIBackend:
    """A ChatBackend over an OpenAI-compatible endpoint. ``url``: the server's base URL (see
    ``chat_url``); ``model``: the name the server knows (default: its only model, from
    GET /v1/models); ``api_key_env``: the environment variable holding the key (unset: no
    key is sent); ``retries``: further tries after a 5xx, a 429 or a connection failure,
    ``backoff_s`` apart, doubling (or the server's Retry-After)."""

    def __init__(self, url: str | None = None, model: str | None = None,
                 api_key_env: str | None = None, *, timeout_s: float = 120.0,
                 retries: int = 3, backoff_s: float = 1.0,
                 max_total_tokens: int | None = None) -> None:
        if not url:
            raise ConfigError("the openai explainer needs the endpoint's URL "
                              "(--explainer-url, e.g. http://127.0.0.1:8080/v1)")
        self.url = chat_url(url)
        self._model = model or None
        self.api_key_env = api_key_env
        key = read_env(api_key_env) if api_key_env else None
        self._key_note = (f"the key in ${api_key_env}" if key else
                          f"${api_key_env} is not set" if api_key_env else "no key variable given")
        self.retries = max(0, retries)
        self.backoff_s = backoff_s
        self.usage = TokenUsage(max_total_tokens)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # One client for every thread (httpx.Client is thread-safe): pooled connections.
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0),
                                    follow_redirects=True)
        self._model_lock = threading.Lock()

    @property
    def model(self) -> str:
        with self._model_lock:
            if self._model is None:
                self._model = self._only_model()
            return self._model

    @property
    def name(self) -> str:
        return f"openai:{self.model}"

    def complete(self, messages: Sequence[ChatMessage], options: ChatOptions) -> str:
        self.usage.check()
        payload = {"model": self.model, "messages": [dict(m) for m in messages],
                   "max_tokens": options.max_tokens, "temperature": options.temperature,
                   "seed": options.seed, "stream": False}
        if options.stop:
            payload["stop"] = list(options.stop)
        data = self._request("POST", self.url, json=payload)
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ChatEndpointError(f"{self.url} answered JSON without choices[0].message: "
                                    f"{_one_line(str(data))}; is it a chat completions "
                                    "endpoint?") from None
        usage = data.get("usage") or {}
        # A server that reports no usage is counted at about four characters a token.
        prompt = usage.get("prompt_tokens")
        if not isinstance(prompt, int):
            prompt = sum(len(m["content"]) for m in messages) // 4
        completion = usage.get("completion_tokens")
        if not isinstance(completion, int):
            completion = len(content) // 4
        self.usage.add(prompt_tokens=prompt, completion_tokens=completion)
        return str(content)

    def complete_many(self, conversations: Sequence[Sequence[ChatMessage]],
                      options: ChatOptions, *, workers: int = 4) -> list[str]:
        """Each conversation's reply, in order, with up to ``workers`` requests in flight. The
        first error stops the rest (requests already sent finish) and is raised."""
        if workers <= 1 or len(conversations) <= 1:
            return [self.complete(messages, options) for messages in conversations]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="saescope-chat") as pool:
            futures = [pool.submit(self.complete, messages, options)
                       for messages in conversations]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            for future in futures:
                if future in done and future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
            return [future.result() for future in futures]

    def check(self) -> None:
        """One one-token request, so a bad URL, key or model fails before a long run starts."""
        self.complete([{"role": "user", "content": "Say OK."}], ChatOptions(max_tokens=1))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP ------------------------------------------------------------------------------

    def _only_model(self) -> str:
        models_url = self.url.removesuffix("/chat/completions") + "/models"
        data = self._request("GET", models_url)
        names = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)] \
            if isinstance(data, dict) else []
        if len(names) == 1 and isinstance(names[0], str):
            return names[0]
        listed = ", ".join(str(n) for n in names) or "none"
        raise ChatEndpointError(f"name the model (--explainer-model): {models_url} lists "
                                f"{listed}")

    def _request(self, method: str, url: str, **kwargs: Any) -> Any:
        """The JSON answer, retrying 5xx, 429 and connection failures; ChatEndpointError for
        what retrying cannot fix."""
        tries = self.retries + 1
        for attempt in range(tries):
            last = attempt == tries - 1
            try:
                response = self._client.request(method, url, **kwargs)
            except httpx.UnsupportedProtocol as exc:
                raise ChatEndpointError(f"cannot use {url}: {exc}") from None
            except httpx.TimeoutException:
                if last:
                    raise ChatEndpointError(
                        f"{url} did not answer in time after {tries} tries; is the server "
                        "overloaded, or the model too slow for the timeout?") from None
                self._wait(attempt, None)
                continue
            except httpx.TransportError as exc:
                if last:
                    reason = _one_line(str(exc)) or type(exc).__name__
                    raise ChatEndpointError(
                        f"cannot reach {url} after {tries} tries ({reason}); is the server "
                        "running, and is --explainer-url right?") from None
                self._wait(attempt, None)
                continue
            status = response.status_code
            if status >= 500 or status == 429:
                if last:
                    raise ChatEndpointError(f"{url} answered {status} after {tries} tries: "
                                            f"{_server_message(response)}")
                self._wait(attempt, response.headers.get("retry-after"))
                continue
            if status in (401, 403):
                raise ChatEndpointError(f"{url} refused the API key ({status}: "
                                        f"{_server_message(response)}); {self._key_note}: "
                                        "check it, or name another variable with --api-key-env")
            if status == 404:
                raise ChatEndpointError(f"{url} answered 404 ({_server_message(response)}): "
                                        f"check the model name ({self._model or 'not given'}) "
                                        "and the URL (it usually ends in /v1)")
            if status >= 400:
                raise ChatEndpointError(f"{url} refused the request ({status}): "
                                        f"{_server_message(response)}",
                                        code=_server_code(response))
            try:
                return response.json()
            except ValueError:
                kind = response.headers.get("content-type", "no content type")
                raise ChatEndpointError(
                    f"{url} did not answer JSON ({kind}: {_one_line(response.text, 80)!r}); "
                    "is it an OpenAI-compatible endpoint?") from None
        raise AssertionError("unreachable")

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff_s * 2**attempt
        if retry_after is not None:
            with contextlib.suppress(ValueError):  # an HTTP date: keep the backoff
                delay = max(delay, float(retry_after))
        time.sleep(min(delay, MAX_RETRY_WAIT_S))
