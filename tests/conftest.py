"""Fixtures shared across test folders: the live server (tests/live_server.py), started once per
session for the browser and fuzz tests, its log attached to any failing test that used it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.live_server import Server, running_server


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("explorer")) as srv:
        yield srv


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201
    report = yield
    # A failing test that used the live server shows what the server said.
    funcargs = getattr(item, "funcargs", {})
    srv = funcargs.get("live_server") or funcargs.get("server")
    if report.failed and isinstance(srv, Server):
        report.sections.append(("server log", srv.log()[-8000:]))
    return report
