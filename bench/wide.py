"""Benchmark: a 131,072-wide SAE built over 100k tokens, written to SQLite and PostgreSQL.

    .venv/bin/python bench/wide.py [--d-sae 131072] [--tokens 100000] [--no-pg] [--no-serve]
                                   [--requests 1000] [--workers 2] [--keep DIR]

Model smollm2-135m at its preset's default hook; a RANDOM TopK SAE (k 32) of --d-sae latents,
saved as a SAELens folder (random weights give the shapes and costs of a trained one).

One child process computes the run once (``compute_records``: tokenize, stream, statistics,
logit effects and decoder neighbours; held-out evaluation off) and writes those same records to
a SQLite file and then to a PostgreSQL database (a throwaway cluster started here with
initdb/pg_ctl, as tests/store/conftest.py does), each write timed on its own. Printed:
  - wall seconds of each phase and of each write;
  - peak RSS: the child's own (getrusage ru_maxrss), and sampled every 0.5 s (psutil) its
    background worker's and the sum over the process tree (mapped files shared by the two
    processes count twice there);
  - database bytes and bytes per feature: the SQLite file (with its -wal), and for PostgreSQL
    pg_database_size less that of the same schema empty;
  - then feature JSON latency on the PostgreSQL run: bench/serve.py --db <that URL> --no-search
    (its p50/p99 for the page, the JSON and a no-op route).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL, K = "smollm2-135m", 32


def make_sae(folder: Path, *, d_sae: int) -> Path:
    from app.engine.presets import get_preset
    from app.engine.sae import SAE, SAEConfig

    if not (folder / "cfg.json").exists():
        cfg = SAEConfig(architecture="topk", d_in=576, d_sae=d_sae, k=K,
                        hook_name=get_preset(MODEL).default_hook, model_name=MODEL,
                        context_size=128)
        SAE.from_config(cfg, seed=0).save(folder)
    return folder


def start_pg(workdir: Path) -> tuple[str, list[str]]:
    """A PostgreSQL cluster in `workdir` (fsync on, a real server's setting); its base URL and
    the command that stops it."""
    from tests.pg_cluster import ClusterUnavailable, start_cluster

    try:
        return start_cluster(workdir)
    except ClusterUnavailable as exc:
        raise SystemExit(f"{exc}; or run with --no-pg") from None


def _pg(base: str, sql: str, db: str = "postgres") -> list[tuple]:
    import psycopg

    dsn = base.replace("postgresql+psycopg://", "postgresql://") + f"/{db}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


class TreeRSS:
    """Sampled every 0.5 s: the largest sum of RSS over this process and its descendants, and
    the largest RSS of any one descendant (getrusage's RUSAGE_CHILDREN would count a child's
    pages from before its exec, a copy of this process)."""

    def __init__(self) -> None:
        import psutil

        self.peak = self.peak_child = 0
        self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            total = 0
            for p in [self._me, *self._me.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                if p.pid != self._me.pid:
                    self.peak_child = max(self.peak_child, rss)
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def child(args: argparse.Namespace) -> None:
    """Compute the run once, write it to each database URL; one JSON line of figures."""
    from app.pipeline.build_options import BuildOptions
    from app.pipeline.precompute import _write, compute_records

    tree = TreeRSS()
    out: dict = {}
    t = time.perf_counter()
    opts = BuildOptions(sae_path=Path(args.sae), model=MODEL, n_tokens=args.tokens,
                        db_url=args.urls[0], cache_dir=Path(args.cache), eval_tokens=0,
                        use_activation_cache=False, progress=True, sae_id="wide-random")
    records, result = compute_records(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    out["compute_s"] = time.perf_counter() - t
    out["tokens"] = result.n_tokens
    out["timings"] = result.timings
    out["rss_after_compute_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    writes = []
    for url in args.urls:
        t = time.perf_counter()
        _write(url, records, log=lambda m: print(m, file=sys.stderr, flush=True))
        writes.append(time.perf_counter() - t)
        print(f"wrote {url.split(':')[0]} in {writes[-1]:.1f} s", file=sys.stderr, flush=True)
    out["write_s"] = writes
    out["resumed_at_seq"] = result.resumed_at_seq
    from app.pipeline.checkpoint import Checkpoint

    Checkpoint(result.checkpoint_dir, "").remove()  # as build() does once the run is written
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_tree_rss_mb"] = tree.stop() / 2**20
    out["peak_rss_children_mb"] = tree.peak_child / 2**20
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-sae", type=int, default=131072)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--no-pg", action="store_true")
    parser.add_argument("--no-serve", action="store_true")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", default="", help="work folder to keep (SAE, databases)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sae", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--urls", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from app.settings import get_settings

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="saescope-wide-"))
    work.mkdir(parents=True, exist_ok=True)
    stop_pg: list[str] = []
    print(f"host: {os.cpu_count()} CPUs, {os.popen('uptime').read().strip()}", flush=True)
    try:
        t = time.perf_counter()
        sae_dir = make_sae(work / f"sae-{args.d_sae}", d_sae=args.d_sae)
        print(f"random TopK SAE d_sae={args.d_sae} k={K} on {MODEL} in "
              f"{time.perf_counter() - t:.0f} s: {sae_dir}", flush=True)
        sqlite = work / "wide.db"
        for p in work.glob("wide.db*"):
            p.unlink()
        urls = [f"sqlite:///{sqlite}"]
        empty_pg = 0
        if not args.no_pg:
            pg_dir = work / "pg"
            shutil.rmtree(pg_dir, ignore_errors=True)
            pg_dir.mkdir()
            base, stop_pg = start_pg(pg_dir)
            from app.store.db import upgrade

            for name in ("wide", "empty"):
                _pg(base, f"CREATE DATABASE {name}")
            upgrade(f"{base}/empty")
            empty_pg = _pg(base, "SELECT pg_database_size('empty')")[0][0]
            urls.append(f"{base}/wide")
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", "--tokens", str(args.tokens), "--sae",
             str(sae_dir), "--cache", str(get_settings().cache_dir), "--urls", *urls],
            stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the build failed (exit {proc.returncode})")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        d = args.d_sae
        tm = res["timings"]
        if res["resumed_at_seq"]:
            print(f"NOTE: resumed from a checkpoint at sequence {res['resumed_at_seq']}: the "
                  "stream's time is not a whole build's")
        print(f"\nbuild of {res['tokens']:,} tokens, d_sae {d:,}: {res['compute_s']:.0f} s to "
              f"the records (prepare {tm['prepare']:.0f} s, stream {tm['stream']:.0f} s, "
              f"statistics {tm['finalize_stats']:.0f} s, static features' wait "
              f"{tm['static_wait']:.0f} s ({int(tm['static_units_background'])} of "
              f"{int(tm['static_units_total'])} units in the background), records "
              f"{tm['records']:.0f} s); child wall {time.perf_counter() - t:.0f} s")
        print(f"peak RSS: build process {res['peak_rss_mb']:,.0f} MB "
              f"({res['rss_after_compute_mb']:,.0f} MB before the writes), background worker "
              f"{res['peak_rss_children_mb']:,.0f} MB (sampled), process tree (sampled) "
              f"{res['peak_tree_rss_mb']:,.0f} MB")
        size = sum(p.stat().st_size for p in work.glob("wide.db*"))
        print(f"SQLite: write {res['write_s'][0]:.1f} s, {size / 2**20:,.0f} MiB, "
              f"{size / d:,.0f} bytes/feature")
        if not args.no_pg:
            pg_size = _pg(urls[1].rsplit("/", 1)[0], "SELECT pg_database_size('wide')")[0][0]
            print(f"PostgreSQL: write {res['write_s'][1]:.1f} s (COPY), "
                  f"{(pg_size - empty_pg) / 2**20:,.0f} MiB over an empty schema "
                  f"({empty_pg / 2**20:.1f} MiB), {(pg_size - empty_pg) / d:,.0f} bytes/feature",
                  flush=True)
            if not args.no_serve:
                load = os.popen("uptime").read().strip()
                print(f"\nbench/serve.py on the PostgreSQL run ({load})", flush=True)
                subprocess.run([sys.executable, str(REPO / "bench" / "serve.py"), "--db",
                                urls[1], "--no-search", "--requests", str(args.requests),
                                "--workers", str(args.workers)], check=False)
        print(f"host after: {os.popen('uptime').read().strip()}")
    finally:
        if stop_pg:
            subprocess.run(stop_pg, capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
