"""Fixtures shared across test folders: the live server (tests/live_server.py), started once per
session for the browser tests, its log attached to any failing test that used it (the fuzz test
starts its own, since it writes); a guard that records and refuses network attempts."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.live_server import Server, running_server


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("explorer")) as srv:
        yield srv


@pytest.fixture
def network_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) every DNS lookup and connection the test process attempts."""
    calls: list[str] = []

    def refuse(kind: str):  # noqa: ANN202
        def blocked(*args: object, **kwargs: object) -> None:
            calls.append(f"{kind}{args!r}")
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test guard)")
        return blocked

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    return calls


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201
    report = yield
    # A failing test that used the live server shows what the server said.
    funcargs = getattr(item, "funcargs", {})
    srv = funcargs.get("live_server") or funcargs.get("server") or funcargs.get("fuzz_server")
    if report.failed and isinstance(srv, Server):
        report.sections.append(("server log", srv.log()[-8000:]))
    return report
