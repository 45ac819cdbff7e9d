"""Settings from SAESCOPE_* environment variables; the only module that reads the environment."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.errors import ConfigError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAESCOPE_", extra="ignore")

    # The data folder rule: databases, activation caches and dequantized-model caches live in
    # ./data under the folder a command runs from, trained SAEs in ./models/saes/{model}/{sae}
    # (gitignored in a checkout), unless SAESCOPE_HOME / SAESCOPE_SAES_DIR say otherwise.
    # Relative paths are resolved once, when the settings are read.
    home: Path = Path("data")
    saes_dir: Path = Path("models") / "saes"
    # SQLAlchemy URL; empty means sqlite file {home}/saescope.db.
    database_url: str = ""
    # Model the server loads for text search and steering; empty: the model of the first SAE.
    model: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    # Model calls (text search, steering) waiting beyond this many get 503 + Retry-After.
    model_queue_size: int = 4
    max_text_tokens: int = 1024
    # Steering: new tokens one generation may ask for, and the wall time after which its
    # streams stop (stop reason "time_limit"), queueing included.
    steer_max_new_tokens: int = 256
    steer_time_limit_s: float = 120.0
    # The OpenAI-compatible /v1/chat/completions: prompt tokens one request may send (an
    # autointerp prompt with twenty marked windows is a few thousand); new tokens and the time
    # limit are steering's (steer_max_new_tokens, steer_time_limit_s).
    chat_max_prompt_tokens: int = 4096

    # Generations (steer, stream, sweep) one signed-in person may run at once with auth=token,
    # counted across every server process; one more is a 429 with Retry-After. Without sign-in
    # (auth=none) only the model queue (model_queue_size) bounds them.
    steer_per_user: int = Field(default=2, ge=1)
    # Threads for the hot reads (feature JSON and pages). Few on purpose: reads are CPU-bound
    # Python, and many threads contending for the GIL stretch every request's latency.
    read_threads: int = 1
    # Server processes. Each one holds its own copy of the model when load_model is on; on a
    # 2-core machine 2 workers serve about 1.5-2x the pages per second of one.
    workers: int = 1
    # One log line per request (uvicorn's access log); off by default: it floods the terminal
    # during a demo and costs CPU on every request. Errors are logged either way.
    access_log: bool = False
    # Set false to serve only precomputed data (no model in memory; text search answers 503).
    load_model: bool = True
    # Where the model runs (auto: CUDA when torch sees a GPU, else cpu; cpu; cuda; cuda:N) and
    # its forward's dtype (float32, bfloat16, float16); the SAEs stay float32.
    device: str = "auto"
    dtype: str = "float32"
    # Who may do what: "none" is one local admin without sign-in (loopback binds only); "token"
    # needs people (`saescope user add`), who sign in with their token or send it as a Bearer.
    auth: Literal["none", "token"] = "none"
    # Signs session cookies; required (and not the placeholder) with auth=token.
    secret_key: str = ""
    # Host names a browser may reach an auth=none server by, besides IP literals: a DNS-rebinding
    # page reaches it under the attacker's own domain name, which this list refuses.
    allowed_hosts: str = "localhost,127.0.0.1,[::1]"
    session_hours: int = 12
    # First admin for a fresh deployment (docker-compose reads both from .env): created with this
    # token by `saescope serve` when the database has no users yet.
    admin_name: str = "admin"
    admin_token: str = ""

    @field_validator("home", "saes_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return (Path.cwd() / value.expanduser()).resolve()

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'saescope.db'}"


def to_environ(settings: Settings) -> dict[str, str]:
    """The settings as SAESCOPE_* variables, for server worker processes that read their own."""
    out = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out[f"SAESCOPE_{name.upper()}"] = text
    return out


def read_env(name: str) -> str | None:
    """One environment variable the user named (e.g. the variable holding an API key), or None
    when it is not set; the environment is read here and nowhere else."""
    return os.environ.get(name)


@lru_cache
def get_settings() -> Settings:
    """The settings from the environment; a bad value is a ConfigError naming its variable (the
    CLI prints it as one line and exits 2, instead of pydantic's traceback)."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "SAESCOPE_" + "_".join(str(p) for p in first["loc"]).upper()
        value = str(first.get("input", ""))[:80]
        raise ConfigError(f"{name}={value!r}: {first['msg']}") from None
