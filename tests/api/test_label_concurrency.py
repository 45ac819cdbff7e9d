"""No lost update through the HTTP API: 32 threads x 25 edits of one label (one annotator, each
edit retried on 412 with a fresh ETag) end at exactly version 801 with 801 revisions, on SQLite
and PostgreSQL. Thousands of requests: marked stress (in `make test`, not `make test-fast`)."""

from __future__ import annotations

import itertools
import random
import threading
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.main import create_app
from app.settings import Settings
from app.store.db import make_engine, read_session, upgrade
from app.store.tables import LabelRevision
from tests.factories import synthetic_database, synthetic_run
from tests.store.conftest import _new_pg_database, pg_server  # noqa: F401 - fixture

SAE_ID = "1-res-topk-64"
THREADS, EDITS = 32, 25


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'race.db'}"
    else:
        url = _new_pg_database(request.getfixturevalue("pg_server"))
    upgrade(url)
    synthetic_database(url, synthetic_run(d_sae=8, n_dead=0, seed=2), migrate=False)
    return url


@pytest.mark.stress
def test_concurrent_edits_lose_nothing(any_db_url, tmp_path):
    app = create_app(Settings(home=tmp_path, database_url=any_db_url, load_model=False,
                              read_threads=2))
    url = f"/api/v1/saes/{SAE_ID}/features/2/label"
    with TestClient(app) as client:
        created = client.put(url, json={"description": "start"}, headers={"If-None-Match": "*"})
        assert created.status_code == 201
        errors: list[str] = []

        def worker(n: int) -> None:
            rng = random.Random(n)
            for i in range(EDITS):
                for attempt in itertools.count(1):
                    tag = client.get(url).headers["etag"]
                    r = client.put(url, json={"description": f"thread {n} edit {i}"},
                                   headers={"If-Match": tag})
                    if r.status_code == 200:
                        break
                    if r.status_code != 412:
                        errors.append(f"{r.status_code} {r.text}")
                        return
                    # Back off a little, as a client should: fewer wasted round trips.
                    time.sleep(rng.uniform(0, 0.003 * min(attempt, 8)))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        final = client.get(url).json()
    assert final["version"] == 1 + THREADS * EDITS
    engine = make_engine(any_db_url)
    with read_session(engine) as session:
        n_revisions = session.scalar(select(func.count()).select_from(LabelRevision)
                                     .where(LabelRevision.label_id == final["id"]))
        versions = session.scalars(select(LabelRevision.version)
                                   .where(LabelRevision.label_id == final["id"])).all()
    engine.dispose()
    assert n_revisions == 1 + THREADS * EDITS
    assert sorted(versions) == list(range(1, 2 + THREADS * EDITS))
