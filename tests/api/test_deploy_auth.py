"""docker-compose.yml serves on 0.0.0.0 with sign-in: the secret key and the first admin come
from the .env file compose reads, and are required."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_compose_app_takes_secret_and_admin_from_env_file():
    yaml = pytest.importorskip("yaml")
    env = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["app"][
        "environment"]
    assert env["SAESCOPE_AUTH"] == "token"
    assert env["SAESCOPE_SECRET_KEY"].startswith("${SAESCOPE_SECRET_KEY:?")
    assert env["SAESCOPE_ADMIN_TOKEN"].startswith("${SAESCOPE_ADMIN_TOKEN:?")
    assert ".env" in (ROOT / ".gitignore").read_text().split()
