"""A real saescope server for the browser and fuzz tests: a database built by `saescope build`
over tiny-llama (plus hostile text written through the store), served by uvicorn on a free port.

`tests/conftest.py` starts one per test session (`live_server`) for the browser tests; the
schemathesis run starts its own, because the fuzzer writes labels, runs and vectors. Its log
is printed when a test that used it fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
XSS = "</script><img src=x onerror=alert(1)>"
MODEL_ID = "tiny-llama"
SAE_ID = "2-res-topk-128"
XSS_MODEL_ID = "xss-lm"
XSS_SAE_ID = "1-res-xss"
XSS_TOKEN_ID = 5
# Features from here up get automatic drafts scored by a scripted scorer (explain_into); tests
# that review or accept drafts use them, so other tests' features keep their labels.
DRAFTED_FROM = 96

CORPUS = {
    "story.txt": " ".join(
        f"Once upon a time the quick brown fox number {i} jumped over the lazy dog, and the "
        "little model watched it closely." for i in range(40)
    ),
    "code.py": "\n".join(
        f"def scale_{i}(x, y):\n    \"\"\"Return x times {i} plus y.\"\"\"\n"
        f"    return x * {i} + y\n\n\tprint('value', scale_{i}(1, 2))\n" for i in range(30)
    ),
    "notes.md": "\n".join(
        f"# Section {i}\n\nPython is a programming language; the standard library has modules "
        f"for files, numbers ({i}, {i * 3}) and text.\n" for i in range(30)
    ),
}


@dataclass
class Server:
    url: str
    log_path: Path
    db_url: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def post_json(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SAESCOPE_HOME=str(home),
               TOKENIZERS_PARALLELISM="false")
    return env


def _build_database(root: Path, db_url: str | None = None) -> str:
    """The real pipeline (`saescope build`) over tiny-llama, then hostile text via the writer."""
    from app.engine.sae import SAE, SAEConfig

    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in CORPUS.items():
        (corpus / name).write_text(text, encoding="utf-8")
    sae_dir = root / "sae"
    cfg = SAEConfig(architecture="topk", d_in=64, d_sae=128, k=8,
                    hook_name="blocks.2.hook_resid_post", model_name=MODEL_ID)
    SAE.from_config(cfg, seed=0).save(sae_dir)
    db_url = db_url or f"sqlite:///{root / 'explorer.db'}"
    cmd = [str(Path(sys.executable).parent / "saescope"), "build", "--sae", str(sae_dir),
           "--model", MODEL_ID, "--corpus", str(corpus), "--tokens", "3072", "--db", db_url,
           "--context-size", "32", "--eval-tokens", "256", "--sae-id", SAE_ID]
    done = subprocess.run(cmd, env=_env(root / "home"), capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"saescope build failed:\n{done.stdout}\n{done.stderr}")

    from tests.factories import synthetic_database, synthetic_run

    vocab = [f"w{i}" for i in range(60)]
    vocab[XSS_TOKEN_ID] = XSS
    vocab[6] = "\n"
    vocab[7] = " the"
    # Every top window of every alive feature holds the hostile token, and it is a logit effect.
    run = synthetic_run(model_id=XSS_MODEL_ID, sae_id=XSS_SAE_ID, d_sae=16, n_dead=1,
                        token_strings=vocab, seed=1)
    run.sequences.tokens[:, 1::3] = XSS_TOKEN_ID
    # Hostile document names too: the dividers where a window crosses documents name them.
    run.sequences.doc_names[:] = [f"{XSS} {i}" for i in range(len(run.sequences.doc_names))]
    run.features.logit_pos_ids[:, 0] = XSS_TOKEN_ID
    run.features.logit_neg_ids[:, 0] = XSS_TOKEN_ID
    synthetic_database(db_url, run, migrate=False, labels=[  # the build migrated it
        {"sae_id": SAE_ID, "index": 3, "description": f"{XSS} label", "tags": ["xss-check"]},
        {"sae_id": SAE_ID, "index": 4, "description": "story words: fox, dog",
         "tags": ["story"]},
        {"sae_id": XSS_SAE_ID, "index": 2, "description": XSS, "tags": ["xss-check"]},
    ])
    from tests.factories import explain_into
    from tests.pipeline.autointerp.scripted import KeywordScorer

    explain_into(db_url, sae_id=SAE_ID, indices=list(range(DRAFTED_FROM, 128)),
                 scorer=KeywordScorer(), cache_dir=root / "home" / "cache")
    return db_url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_answer(url: str, proc: subprocess.Popen, *, timeout: float = 60.0) -> httpx.Response:
    """GET `url` until the server started as `proc` answers; fails if it exits or takes longer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)


def _wait_ready(server: Server, proc: subprocess.Popen, *, timeout: float = 180.0) -> None:
    """Until the pages answer and the model has loaded (text search stops answering 503)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            status, _ = server.post_json(f"/api/v1/saes/{SAE_ID}/search", {"text": "hi"})
            if status == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{server.log()}")


@contextmanager
def running_server(root: Path, db_url: str | None = None, **env: str) -> Iterator[Server]:
    """Build the database (a SQLite file under `root` unless `db_url`), start the server (with
    more SAESCOPE_* variables from `env`), and stop it on exit."""
    db_url = _build_database(root, db_url)
    with _serving(root, db_url, _wait_ready, **env) as srv:
        yield srv


@contextmanager
def chat_server(root: Path, **env: str) -> Iterator[Server]:
    """A server with tiny-llama loaded over an empty database (no build): enough for the
    OpenAI-compatible /v1 routes, and ready in seconds. `env`: more SAESCOPE_* variables (for
    auth=token, create the users in `{root}/chat.db` first)."""
    db_url = f"sqlite:///{root / 'chat.db'}"
    with _serving(root, db_url, _wait_model, **env) as srv:
        yield srv


def _wait_model(server: Server, proc: subprocess.Popen, *, timeout: float = 120.0) -> None:
    """Until /v1/chat/completions answers something other than 503 (the model loading)."""
    deadline = time.monotonic() + timeout
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.post(f"{server.url}/v1/chat/completions", json=body,
                          timeout=30).status_code != 503:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"model not loaded after {timeout:.0f} s:\n{server.log()}")


@contextmanager
def _serving(root: Path, db_url: str, wait: Callable[[Server, subprocess.Popen], None],
             **extra_env: str) -> Iterator[Server]:
    port = free_port()
    log_path = root / "server.log"
    env = _env(root / "home")
    env.update(SAESCOPE_DATABASE_URL=db_url, SAESCOPE_MODEL=MODEL_ID, **extra_env)
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"],
            cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    srv = Server(url=f"http://127.0.0.1:{port}", log_path=log_path, db_url=db_url)
    try:
        wait(srv, proc)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
