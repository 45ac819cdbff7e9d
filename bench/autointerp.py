"""Benchmark: how predictive automatic descriptions are, on the default SAE, in one run.

    .venv/bin/python bench/autointerp.py [--db URL] [--sae ID] [--features 200] [--seed 0]
                                         [--results FILE] [--pool-sequences 64] [--windows 20]
                                         [--batch 10] [--explain-tokens 64]

For a seeded sample of `--features` live features it scores, with one local scorer (the default
model unless --scorer-model) and the same windows for every explanation of a feature:
  - the pattern explainer's description (no model);
  - the local-model explainer's description (the same model, activation-examples prompt);
  - the random-explanation control (another live feature's pattern description, as
    `saescope explain` reports beside each score);
by detection and fuzzing balanced accuracy (app/pipeline/autointerp/scoring.py), and prints one
table: the mean of each score (with its standard error and the number of features scored) and
each explainer's features/s (explaining and scoring both methods, on this machine).

Nothing is written to the database. Each feature's results are appended to --results (JSON
lines), so a killed run resumes where it stopped and the table covers every line in the file;
the file records the options it was made with and refuses to mix runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's app, when run as a script

from app.pipeline.autointerp.backends import ChatOptions  # noqa: E402
from app.pipeline.autointerp.explain_job import control_explanation  # noqa: E402
from app.pipeline.autointerp.llm_explainer import llm_explain  # noqa: E402
from app.pipeline.autointerp.local_backend import LocalBackend  # noqa: E402
from app.pipeline.autointerp.negatives import pool_from_store  # noqa: E402
from app.pipeline.autointerp.pattern import explain_pattern  # noqa: E402
from app.pipeline.autointerp.scoring import ScoringOptions, score_explanation  # noqa: E402
from app.settings import get_settings  # noqa: E402
from app.store import queries  # noqa: E402
from app.store.db import make_engine, read_session  # noqa: E402
from app.store.tables import SCORE_METHODS  # noqa: E402

ROWS = ("pattern", "local", "control")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default=f"sqlite:///{REPO / 'data' / 'saescope.db'}")
    ap.add_argument("--sae", default=None, help="default: the database's first SAE")
    ap.add_argument("--features", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scorer-model", default=None, help="default: the default preset")
    ap.add_argument("--pool-sequences", type=int, default=64)
    ap.add_argument("--windows", type=int, default=20, help="detection: this many activating "
                    "and this many zero windows; fuzzing: this many windows (explain's default 20)")
    ap.add_argument("--batch", type=int, default=10, help="windows per scorer prompt")
    ap.add_argument("--explain-tokens", type=int, default=64, help="the local explainer's reply "
                    "budget (explain's default 64)")
    ap.add_argument("--results", type=Path, default=REPO / "data" / "bench-autointerp.jsonl")
    ap.add_argument("--report-only", action="store_true", help="print the table of --results")
    return ap.parse_args()


def sample_features(engine, sae_id: str, n: int, seed: int) -> tuple[list[int], list[int]]:
    """(the sampled live features, ascending; every live feature)."""
    with read_session(engine) as session:
        targets = queries.explain_targets(session=session, sae_id=sae_id, indices=None)
        alive = queries.alive_features(session=session, run_id=targets.run_id)
    rng = np.random.default_rng([seed, 7])
    picked = rng.choice(len(alive), size=min(n, len(alive)), replace=False)
    return sorted(alive[int(i)] for i in picked), alive


def load_done(path: Path, header: dict) -> dict[int, dict]:
    if not path.exists():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if lines and lines[0].get("header") != header:
        sys.exit(f"{path} holds a run with other options ({lines[0].get('header')}); "
                 "use another --results or remove it")
    return {row["feature"]: row for row in lines[1:]}


def score_row(feature, text: str, *, scorer, pool, seed: int, options: ScoringOptions) -> dict:
    out = {"text": text}
    for method in SCORE_METHODS:
        record = score_explanation(feature, text, method=method, scorer=scorer, seed=seed,
                                   negatives=pool, options=options)
        out[method] = record.score
        out[f"{method}_windows"] = record.n_windows
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    se = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else float("nan")
    return float(arr.mean()), se


def report(rows: list[dict], header: dict) -> None:
    print(f"\n{len(rows)} features of {header['sae']} (seed {header['seed']}), scorer "
          f"{header['scorer']}; balanced accuracy mean +- standard error (features scored)")
    print("| explainer | detection | fuzzing | features/s |")
    print("|---|---|---|---|")
    for name in ROWS:
        cells = []
        for method in SCORE_METHODS:
            values = [r[name][method] for r in rows if r[name][method] is not None]
            if values:
                m, se = mean_se(values)
                cells.append(f"{m:.3f} +- {se:.3f} ({len(values)})")
            else:
                cells.append("-")
        seconds = sum(r[name]["seconds"] for r in rows)
        rate = f"{len(rows) / seconds:.3f}" if seconds else "-"
        print(f"| {name} | {cells[0]} | {cells[1]} | {rate} |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main() -> None:
    args = parse_args()
    engine = make_engine(args.db)
    with read_session(engine) as session:
        sae_id = args.sae or queries.list_saes(session=session)[0].id
    options = ScoringOptions(n_activating=args.windows, n_zero=args.windows,
                             n_fuzz=args.windows, batch_size=args.batch, answer_tokens=32)
    if args.report_only:
        lines = [json.loads(x) for x in args.results.read_text().splitlines() if x.strip()]
        report(lines[1:], lines[0]["header"])
        return
    features, alive = sample_features(engine, sae_id, args.features, args.seed)
    scorer = LocalBackend(args.scorer_model)
    header = {"sae": sae_id, "seed": args.seed, "features": args.features,
              "scorer": scorer.name, "pool_sequences": args.pool_sequences,
              "options": dataclasses.asdict(options), "explain_tokens": args.explain_tokens}
    done = load_done(args.results, header)
    todo = [i for i in features if i not in done]
    print(f"{len(features)} live features sampled of {len(alive)}; {len(done)} done before, "
          f"{len(todo)} to go; scorer {scorer.name}", flush=True)
    pool = pool_from_store(engine, sae_id=sae_id, n_sequences=args.pool_sequences,
                           seed=args.seed, cache_dir=get_settings().cache_dir, log=print)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if not args.results.exists():
        args.results.write_text(json.dumps({"header": header}) + "\n")
    from tqdm import tqdm

    for index in tqdm(todo, unit="feature", desc="autointerp bench"):
        with read_session(engine) as session:
            feature = queries.get_feature(session=session, sae_id=sae_id, index=index)
            control = control_explanation(session, feature=feature, alive=alive,
                                          seed=args.seed)
        row: dict = {"feature": index}
        explainers = {
            "pattern": explain_pattern,
            "local": lambda f: llm_explain(f, scorer, ChatOptions(
                max_tokens=args.explain_tokens, seed=args.seed)),
            "control": lambda f, c=control: c[0] if c else "",
        }
        for name, explain in explainers.items():
            t0 = time.perf_counter()
            text = explain(feature).strip() or "(no description)"
            row[name] = score_row(feature, text, scorer=scorer, pool=pool, seed=args.seed,
                                  options=options)
            row[name]["seconds"] = time.perf_counter() - t0
        with args.results.open("a") as out:
            out.write(json.dumps(row) + "\n")
    lines = [json.loads(x) for x in args.results.read_text().splitlines() if x.strip()]
    report(lines[1:], header)
    engine.dispose()


if __name__ == "__main__":
    main()
