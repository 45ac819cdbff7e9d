"""Benchmark: label search latency over 100k synthetic labels, and concurrent label writes.

    .venv/bin/python bench/labels.py [--db URL] [--labels 100000] [--queries 1000] [--writers 8]
                                     [--writes 400]

Without --db it writes a fresh SQLite file under data/ (removed at the end). Reported, in one run:
  - label search (app.store.labels.search_labels, the function the API and pages call): p50/p99
    of queries of one to three words drawn from the labels' vocabulary (the last word a prefix),
    without and with a tag filter, beside the p50 of a primary-key read of one label (the floor
    of any query through the same session);
  - label writes: `--writers` threads editing their own labels through update_label (each one
    durable, synchronous=FULL on SQLite), writes per second over the whole run.
Targets (issue 11): search p99 <= 20 ms on one core, >= 200 writes/s with 8 writers on SQLite.

Search times are given twice: wall clock, and the querying thread's CPU time. On a machine whose
cores are shared with other jobs (the load average is printed before and after) the wall clock
includes the time the thread waited for a core; its CPU time is what one core spends per query.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import insert, select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's app, when run as a script

from app.store import labels as store  # noqa: E402
from app.store.db import make_engine, read_session, upgrade, write_session  # noqa: E402
from app.store.tables import Label, LabelTag, utcnow  # noqa: E402

WORDS = [f"w{i}" for i in range(2000)] + [
    "bracket", "python", "keyword", "number", "digit", "comma", "quote", "newline", "indent",
    "english", "verb", "noun", "plural", "date", "url", "code", "string", "function", "class",
]
TAGS = [f"tag{i}" for i in range(50)]
SAE_ID = "bench-sae"


def fill(engine, n: int, rng: random.Random) -> None:
    """n labels of 4-12 words each, Zipf-ish word frequencies, 0-3 tags; bulk inserted."""
    weights = [1 / (i + 1) for i in range(len(WORDS))]
    now = utcnow()
    chunk = 5000
    for start in range(0, n, chunk):
        rows = []
        for i in range(start, min(n, start + chunk)):
            words = rng.choices(WORDS, weights, k=rng.randint(4, 12))
            rows.append({"sae_id": SAE_ID, "feature_index": i, "author": "bench",
                         "author_kind": "person", "description": " ".join(words),
                         "tags": rng.sample(TAGS, rng.randint(0, 3)), "status": "draft",
                         "notes": "", "version": 1, "created_at": now, "updated_at": now})
        with write_session(engine) as session:
            ids = session.scalars(insert(Label).returning(Label.id, sort_by_parameter_order=True),
                                  rows).all()
            tags = [{"label_id": label_id, "tag": t}
                    for label_id, row in zip(ids, rows, strict=True) for t in row["tags"]]
            if tags:
                session.execute(insert(LabelTag), tags)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_search(engine, n_queries: int, rng: random.Random) -> None:
    weights = [1 / (i + 1) for i in range(len(WORDS))]
    queries = []
    for _ in range(n_queries):
        words = rng.choices(WORDS, weights, k=rng.randint(1, 3))
        words[-1] = words[-1][: max(2, len(words[-1]) - 1)]  # a prefix, as typed
        queries.append(" ".join(words))
    with read_session(engine) as session:
        floor = []
        for i in range(200):
            t0 = time.perf_counter()
            session.execute(select(Label.id).where(Label.id == i + 1)).all()
            floor.append(time.perf_counter() - t0)
        for tag_filter in (False, True):
            times, cpu = [], []
            for q in queries:
                tag = rng.choice(TAGS) if tag_filter else None
                t0, c0 = time.perf_counter(), time.thread_time()
                store.search_labels(session=session, q=q, tag=tag, limit=50)
                cpu.append(time.thread_time() - c0)
                times.append(time.perf_counter() - t0)
            print(f"search {'with' if tag_filter else 'without'} tag filter, {len(times)} "
                  f"queries: wall p50 {1e3 * statistics.median(times):.2f} ms, "
                  f"p99 {1e3 * percentile(times, 0.99):.2f} ms; CPU p50 "
                  f"{1e3 * statistics.median(cpu):.2f} ms, "
                  f"p99 {1e3 * percentile(cpu, 0.99):.2f} ms")
        print(f"primary-key read (floor): p50 {1e3 * statistics.median(floor):.3f} ms")


def bench_writes(engine, writers: int, writes: int) -> None:
    per_writer = writes // writers
    labels = [store.create_label(engine, sae_id=SAE_ID, index=10_000_000 + w,
                                 author=f"writer{w}", edit=store.LabelEdit(description="start"))
              for w in range(writers)]
    errors: list[BaseException] = []

    def run(w: int) -> None:
        version = 1
        try:
            for i in range(per_writer):
                done = store.update_label(engine, label_id=labels[w].id, expected_version=version,
                                          edit=store.LabelEdit(description=f"edit {i}"),
                                          actor=f"writer{w}")
                version = done.version
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(writers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    total = per_writer * writers
    print(f"writes: {total} durable edits by {writers} writers in {elapsed:.2f} s = "
          f"{total / elapsed:.0f}/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=None)
    parser.add_argument("--labels", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--writes", type=int, default=400)
    args = parser.parse_args()
    print("load average before: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    rng = random.Random(0)
    tmp = None
    url = args.db
    if url is None:
        Path("data").mkdir(exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="bench-labels-", dir="data")
        url = f"sqlite:///{tmp}/labels.db"
    upgrade(url)
    engine = make_engine(url)
    t0 = time.perf_counter()
    fill(engine, args.labels, rng)
    print(f"{args.labels} labels written in {time.perf_counter() - t0:.1f} s ({url})")
    bench_search(engine, args.queries, rng)
    bench_writes(engine, args.writers, args.writes)
    print("load average after: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    engine.dispose()
    if tmp is not None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
