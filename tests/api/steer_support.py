"""Shared parts of the steering API tests: a database over a tiny random Llama and a random TopK
SAE, the app over it, a service whose steps the test releases one by one, and an ASGI call the
test can read chunk by chunk and disconnect when it chooses."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import orjson

from app.main import create_app
from app.settings import Settings
from tests.factories import SERVED_HOOK, SERVED_SAE_ID, engine_ready, served_sae_database

SAE_ID = SERVED_SAE_ID
HOOK = SERVED_HOOK
PROMPT = "def add(a, b):"
WAIT = 60  # seconds; only a broken server ever waits this long


def build_database(home: Path) -> tuple[Path, str]:
    """A SQLite file listing a tiny random Llama and a random TopK SAE saved under `home`
    (tests.factories.served_sae_database)."""
    served_sae_database(home, name="steer.db")
    return home, f"sqlite:///{home / 'steer.db'}"


def make_app(database, **overrides):
    home, url = database
    settings = Settings(home=home, database_url=url, load_model=True, max_text_tokens=32,
                        steer_max_new_tokens=24, **overrides)
    return create_app(settings)


def wait_ready(app) -> None:
    engine_ready(app, timeout=WAIT)


def request(**overrides):
    return {"sae_id": SAE_ID, "prompt": PROMPT, "max_new_tokens": 8, **overrides}


STEERED = [{"index": 5, "mode": "add", "value": 60.0}]


def parse_sse(raw: str) -> list[tuple[str, dict]]:
    events = []
    for block in re.split(r"\r?\n\r?\n", raw):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events.append((fields["event"], orjson.loads(fields["data"])))
    return events


class SteppedService:
    """The real service, with each step of a generation held until the test releases it."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.permits = threading.Semaphore(0)
        self.closed = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _held(self, steps):
        try:
            while True:
                assert self.permits.acquire(timeout=WAIT), "the test never released a step"
                try:
                    item = next(steps)
                except StopIteration:
                    return
                yield item
        finally:
            self.closed.set()

    def steer_stream(self, **kwargs):
        return self._held(self.inner.steer_stream(**kwargs))

    def steer_sweep(self, **kwargs):
        return self._held(self.inner.steer_sweep(**kwargs))


class ASGICall:
    """One POST driven straight through the ASGI app, so the test sees each body chunk as it is
    sent and can disconnect at a moment of its choosing."""

    def __init__(self, app, path: str, body: dict, *, headers: dict[str, str] | None = None
                 ) -> None:
        self.sent: asyncio.Queue[dict] = asyncio.Queue()
        self.left = asyncio.Event()
        payload = orjson.dumps(body)
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await self.left.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": b"", "root_path": "", "client": ("test", 1),
                 "server": ("test", 80),
                 "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                             *((k.lower().encode(), v.encode())
                               for k, v in (headers or {}).items())]}
        self.task = asyncio.create_task(app(scope, receive, self.sent.put))
        self.text = ""

    async def status(self) -> int:
        message = await asyncio.wait_for(self.sent.get(), WAIT)
        assert message["type"] == "http.response.start"
        return message["status"]

    async def until(self, predicate) -> list[tuple[str, dict]]:
        """Read body chunks until the events so far satisfy predicate; the events."""
        while not predicate(parse_sse(self.text)):
            message = await asyncio.wait_for(self.sent.get(), WAIT)
            self.text += message.get("body", b"").decode()
        return parse_sse(self.text)
