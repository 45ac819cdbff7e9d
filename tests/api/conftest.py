"""API fixtures: a real SQLite file holding one synthetic run, and the app over it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.factories import SyntheticRun, synthetic_database, synthetic_run

SAE_ID = "1-res-topk-64"


@pytest.fixture
def db_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'api.db'}"


@pytest.fixture
def records(db_url) -> SyntheticRun:
    rec = synthetic_run(d_sae=32, n_dead=2, seed=5)
    synthetic_database(db_url, rec, labels=[
        {"sae_id": SAE_ID, "index": 4, "description": "digits", "tags": ["numbers"]},
        {"sae_id": SAE_ID, "index": 6, "description": "commas"},
    ])
    return rec


@pytest.fixture
def settings(db_url, tmp_path) -> Settings:
    return Settings(home=tmp_path, database_url=db_url, load_model=False, model_queue_size=2,
                    max_text_tokens=16)


@pytest.fixture
def client(records, settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c
