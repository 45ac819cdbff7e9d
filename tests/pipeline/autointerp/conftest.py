"""A planted-token database (tests/pipeline/autointerp/scripted.py) shared by a test module."""

from __future__ import annotations

import pytest

from app.store.db import make_engine
from tests.pipeline.autointerp.scripted import planted_database


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(engine, run records, rule-encoded pool) of a small planted database."""
    url = f"sqlite:///{tmp_path_factory.mktemp('planted') / 'planted.db'}"
    run, pool = planted_database(url)
    engine = make_engine(url)
    yield engine, run, pool
    engine.dispose()
