"""Benchmark: serving latency of the feature page and feature JSON, and text search vs run-to-hook.

    .venv/bin/python bench/serve.py [--db URL] [--features 16384] [--requests 2000]
                                    [--concurrency 8] [--no-search]

Without --db it writes (once, then reuses) data/bench-serve-{features}-v2.db: a synthetic run
with the pipeline's default shapes (20 top windows, 10 bands x 3 samples, 32-token windows,
128-token sequences) for a RANDOM TopK SAE of that width on smollm2-135m at
blocks.15.hook_resid_post, saved as a real SAELens folder so the server loads it for text search.
Feature contents are made up (tests/factories.py) but shaped like the demo run's, measured on
data/saescope.db: windows of 28-32 tokens, 8% of window tokens active, token ids with Zipf
frequencies. (A page's cost depends on these: an active token's span is built per request, an
inactive one is a cached string.) `--db sqlite:///data/saescope.db` measures the demo run itself.

One server (`saescope serve`, --workers processes, default 1) in a subprocess; clients are
bare asyncio HTTP/1.1 keep-alive connections in this process (see load_test). Reported, in one run:
  - p50/p99 of GET /{model}/{sae}/{index} (HTML) and GET /api/v1/saes/{sae}/features/{index}
    over --requests random features each, --concurrency clients at once, each route on its own,
    beside GET /_ping (a route that does nothing) under the same concurrency; then each route's
    p50 with one client (its service time, no queueing). With N closed-loop clients on one
    process, latency is about N x service time, so the one-client figures say where time goes;
  - text search: POST /api/v1/saes/{sae}/search on a 64-token prompt (sequential, p50) against
    the bare run_to_hook of the same 64 ids in this process (p50), and their ratio.
The machine is shared and has 2 cores, clients and server included: figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL, HOOK, K = "smollm2-135m", "blocks.15.hook_resid_post", 32
PROMPT = (
    "The json module can serialize Python objects to text. Call json.dumps(obj, indent=2) to get "
    "a pretty string, and json.loads(text) to read it back.\n\ndef load(path):\n"
    "    with open(path) as f:\n        return json.load(f)\n"
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = min(int(round(q / 100 * (len(ordered) - 1))), len(ordered) - 1)
    return ordered[pos]


def build_demo_db(path: Path, *, d_sae: int, lm) -> str:  # noqa: ANN001
    """A synthetic run of the pipeline's default shapes for a random SAE saved on disk."""
    from app.engine.sae import SAE, SAEConfig
    from app.records import ModelRecord, SAERecord
    from tests.factories import synthetic_database, synthetic_run

    sae_id = f"15-res-topk-{d_sae // 1024}k"
    folder = path.parent / f"bench-serve-sae-{d_sae}"
    cfg = SAEConfig(architecture="topk", d_in=lm.d_model, d_sae=d_sae, k=K, hook_name=HOOK,
                    model_name=MODEL)
    if not (folder / "cfg.json").exists():
        SAE.from_config(cfg, seed=0).save(folder)
    url = f"sqlite:///{path}"
    if path.exists():
        return url
    t0 = time.perf_counter()
    rec = synthetic_run(d_sae=d_sae, vocab_size=lm.vocab_size, n_seq=4000, context_size=128,
                        window_len=32, n_top=20, n_bands=10, per_band=3, n_bins=64,
                        n_logits=10, n_neighbours=10, n_dead=d_sae // 50, model_id=MODEL,
                        sae_id=sae_id, corpus="synthetic (bench)", seed=0,
                        token_strings=lm.token_strings(), active_frac=0.08,
                        min_window_len=28, zipf_tokens=True)
    rec.model = ModelRecord(model_id=MODEL, source=MODEL, architecture=lm.architecture,
                            d_model=lm.d_model, n_layers=lm.n_layers, vocab_size=lm.vocab_size,
                            token_strings=lm.token_strings(), bos_token_id=lm.bos_token_id,
                            has_chat_template=lm.has_chat_template)
    rec.sae = SAERecord(model_id=MODEL, sae_id=sae_id, hook_name=HOOK, architecture="topk",
                        d_in=lm.d_model, d_sae=d_sae, path=str(folder),
                        cfg={"architecture": "topk", "k": K, "d_in": lm.d_model, "d_sae": d_sae})
    tmp = path.with_suffix(".tmp.db")
    tmp.unlink(missing_ok=True)
    synthetic_database(f"sqlite:///{tmp}", rec)
    tmp.rename(path)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in "
          f"{time.perf_counter() - t0:.0f} s")
    return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def start_server(db_url: str, *, search: bool, workers: int, log_path: Path
                 ) -> tuple[subprocess.Popen, str]:
    """`saescope serve` itself, in a subprocess."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", SAESCOPE_MODEL=MODEL)
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from app.cli import app; app()", "serve", "--db", db_url,
         "--port", str(port), "--model" if search else "--no-model", "--workers", str(workers)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(base + "/_ping", timeout=2).read()
            return proc, base
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                break
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit(f"server did not start; see {log_path}")


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
               accept: str) -> tuple[int, bytes]:
    """One GET over a kept-alive HTTP/1.1 connection; the body is read to its last byte."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: {accept}\r\n\r\n".encode())
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    length = next((int(v) for k, _, v in (line.partition(":") for line in head[1:])
                   if k.lower() == "content-length"), None)
    if length is None:
        raise SystemExit(f"{path}: no Content-Length (chunked responses are not expected here)")
    return status, await reader.readexactly(length)


async def load_test(base: str, paths: list[tuple[str, str]], *, concurrency: int
                    ) -> dict[str, list[float]]:
    """Each client takes the next path from a shared queue; latency per request, by label.

    Clients are bare asyncio connections speaking HTTP/1.1 with keep-alive: client and server
    share the machine's two cores, and a full HTTP client library (httpx) spent more CPU per
    request than the server's no-op route, which then showed up in every latency.
    """
    host, port = base.removeprefix("http://").split(":")
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for item in paths:
        queue.put_nowait(item)
    times: dict[str, list[float]] = {}
    failures: list[str] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while not queue.empty():
                label, path = queue.get_nowait()
                accept = "text/html" if label == "page" else "application/json"
                t0 = time.perf_counter()
                status, _ = await _get(reader, writer, path, accept)
                elapsed = time.perf_counter() - t0
                if status != 200:
                    failures.append(f"{path}: {status}")
                times.setdefault(label, []).append(elapsed * 1000)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    if failures:
        raise SystemExit(f"{len(failures)} failed requests, e.g. {failures[:3]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="", help="database URL (default: a synthetic one)")
    parser.add_argument("--features", type=int, default=16384)
    parser.add_argument("--requests", type=int, default=2000, help="per measured route")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes (saescope serve --workers)")
    parser.add_argument("--no-search", action="store_true", help="skip the text-search part")
    parser.add_argument("--only-search", action="store_true",
                        help="run only the text-search part (no load test)")
    args = parser.parse_args()

    from app.engine.loading import load_model
    from app.settings import get_settings

    t0 = time.perf_counter()
    lm = load_model(MODEL, cache_dir=get_settings().cache_dir)
    print(f"model {MODEL} loaded in {time.perf_counter() - t0:.0f} s")
    data_dir = REPO / "data"
    data_dir.mkdir(exist_ok=True)
    db_url = args.db or build_demo_db(data_dir / f"bench-serve-{args.features}-v2.db",
                                      d_sae=args.features, lm=lm)

    proc, base = start_server(db_url, search=not args.no_search, workers=args.workers,
                              log_path=data_dir / "bench-serve.log")
    try:
        import httpx

        saes = httpx.get(base + "/api/v1/saes").json()["data"]
        sae = next(s for s in saes if s["has_features"])
        model_id, sae_id, d_sae = sae["model_id"], sae["id"], sae["d_sae"]
        ids = lm.tokenize(PROMPT)[:64]
        text = lm.decode(ids[1:])
        search_url = f"{base}/api/v1/saes/{sae_id}/search"
        status, body = 0, {}
        if not args.no_search:
            # The server loads the model on a thread at start; wait, so loading does not
            # compete with the measured requests.
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                status, body = post(search_url, {"text": text})
                if status == 200:
                    break
                time.sleep(1)

        rng = random.Random(0)
        n = args.requests
        routes = [
            ("feature page  GET /{m}/{s}/{i}", "page", "<= 80 ms",
             [("page", f"/{model_id}/{sae_id}/{rng.randrange(d_sae)}") for _ in range(n)]),
            ("feature JSON  GET /api/v1/.../{i}", "json", "<= 50 ms",
             [("json", f"/api/v1/saes/{sae_id}/features/{rng.randrange(d_sae)}")
              for _ in range(n)]),
            ("no-op         GET /_ping", "noop", "", [("noop", "/_ping")] * n),
        ]
        if args.only_search:
            routes = []
        warm = [item for *_, paths in routes for item in paths[:100]]
        asyncio.run(load_test(base, warm, concurrency=args.concurrency))
        print(f"\nSAE {sae_id} ({d_sae} features); each route alone, {n} requests, "
              f"{args.concurrency} concurrent clients (random features), "
              f"{args.workers} server process{'es' if args.workers > 1 else ''}")
        print(f"{'route':<34} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>6}  target p99")
        for name, key, target, paths in routes:
            t0 = time.perf_counter()
            vals = asyncio.run(load_test(base, paths, concurrency=args.concurrency))[key]
            rate = len(vals) / (time.perf_counter() - t0)
            print(f"{name:<34} {statistics.median(vals):>8.1f} {percentile(vals, 99):>8.1f} "
                  f"{rate:>6.0f}  {target}")
        # One request at a time: each route's service time, without queueing.
        one = {key: asyncio.run(load_test(base, paths[:300], concurrency=1))[key]
               for _, key, _, paths in routes}
        print("one client, p50: " + ", ".join(
            f"{key} {statistics.median(v):.1f} ms" for key, v in one.items()))

        if args.no_search:
            return
        url = search_url
        if status != 200:
            print(f"\ntext search skipped: {status} {body}")
            return
        n_tok = len(body["tokens"])
        import torch

        # Interleaved (one search, then one bare run), so load from elsewhere on the shared
        # machine falls on both sides alike instead of on whichever loop it happened to hit.
        search_ms, bare_ms = [], []
        with torch.inference_mode():
            lm.run_to_hook(ids, HOOK)
            for _ in range(25):
                t0 = time.perf_counter()
                post(url, {"text": text})
                search_ms.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                lm.run_to_hook(ids, HOOK)
                bare_ms.append((time.perf_counter() - t0) * 1000)
        s50, b50 = statistics.median(search_ms), statistics.median(bare_ms)
        print(f"\ntext search, {n_tok}-token prompt (server: {n_tok} tokens incl. BOS; bare: "
              f"{len(ids)} ids)")
        print(f"POST /api/v1/saes/{sae_id}/search p50 {s50:7.1f} ms")
        print(f"bare run_to_hook({HOOK}) p50  {b50:7.1f} ms")
        print(f"ratio {s50 / b50:.2f}x (target <= 1.3x)")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
