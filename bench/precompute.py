"""Benchmark: precompute pipeline tokens/s against bare run-to-hook and run-to-hook + SAE encode.

    .venv/bin/python bench/precompute.py [--tokens 100000] [--rss-tokens 100000,400000]

Model smollm2-135m at blocks.15.hook_resid_post; a RANDOM TopK SAE (d_sae 16384, k 32) since no
trained 16k SAE exists here (random weights give the same shapes, L0 and costs as a trained
one; feature content does not affect speed).

Speed: one `build` on the first --tokens tokens of python-docs (default: `saescope build`'s own
default), held-out evaluation off (it is extra forwards, reported by `saescope build`). Before
each of the build's batches the same batch is also run (1) to the hook only and (2) to the hook
+ the encode the pipeline uses, ``SAE.encode_sparse``, each timed on its own, so load from other
processes on this shared machine hits the three alike. encode_sparse is the fastest encode this
project has (the dense ``SAE.encode`` also writes the [tokens, d_sae] code; it is timed on every
4th batch for reference only). Pipeline time = the build's stream + finalize (statistics, the
static features' remainder, records) + database write, minus those extra measurements.
Corpus loading and tokenization are outside it, as they are outside the baselines.
Bookkeeping: the seconds inside ``FeatureAccumulators.feed`` alone (top windows, interval
samples, statistics), as tokens/s: the ceiling the accumulators put on any forward; wall clock
and the calling thread's CPU time (``time.thread_time``: what the host's other load changes
least).

The static features (logit effects, decoder neighbours) start in a nice-19 worker process when
the weights load and take the CPU the stream leaves idle; it is paused while the extra
measurements run, so it gets only what the build's own batches leave. The bench prints how many
of their units were done when the stream ended and how long the build then waited for the rest.

Memory: one `build` per --rss-tokens value, each in a fresh subprocess; peak RSS from
resource.getrusage (ru_maxrss). Database bytes per feature = SQLite file size / d_sae.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODEL, HOOK, D_SAE, K = "smollm2-135m", "blocks.15.hook_resid_post", 16384, 32


def cli_default_tokens() -> int:
    from app.pipeline.precompute import BuildOptions

    return BuildOptions.__dataclass_fields__["n_tokens"].default


def make_sae(folder: Path) -> Path:
    from app.engine.sae import SAE, SAEConfig

    if not (folder / "cfg.json").exists():
        cfg = SAEConfig(architecture="topk", d_in=576, d_sae=D_SAE, k=K, hook_name=HOOK,
                        model_name=MODEL, context_size=128)
        SAE.from_config(cfg, seed=0).save(folder)
    return folder


def db_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))


def build_once(*, sae_dir: Path, tokens: int, work: Path, eval_tokens: int, lm=None, sae=None):
    from app.pipeline.precompute import BuildOptions, build

    db = work / f"bench-{tokens}.db"
    for p in db.parent.glob(db.name + "*"):
        p.unlink()
    opts = BuildOptions(sae_path=sae_dir, model=MODEL, n_tokens=tokens, batch_size=16,
                        db_url=f"sqlite:///{db}", cache_dir=work / "cache",
                        use_activation_cache=False, eval_tokens=eval_tokens, progress=False,
                        sae_id=f"bench-{tokens}")
    result = build(opts, log=lambda m: None, lm=lm, sae=sae)
    return result, db


def child(args: argparse.Namespace) -> None:
    """One build in this process; print a JSON line with peak RSS and timings."""
    t = time.perf_counter()
    result, db = build_once(sae_dir=Path(args.sae), tokens=args.tokens, work=Path(args.work),
                            eval_tokens=4096)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens": result.n_tokens, "peak_rss_mb": rss_kb / 1024,
                      "wall_s": time.perf_counter() - t, "timings": result.timings,
                      "db_bytes": db_bytes(db)}))


def speed(args: argparse.Namespace, sae_dir: Path, work: Path) -> dict:
    import app.pipeline.build_inputs as bi
    import app.pipeline.precompute as pc
    from app.engine.loading import load_model
    from app.engine.sae import SAE
    from app.pipeline.accumulators import FeatureAccumulators
    from app.settings import get_settings

    lm = load_model(MODEL, cache_dir=get_settings().cache_dir)
    sae = SAE.load(sae_dir).eval()
    extra = {"hook": 0.0, "hook_encode": 0.0, "dense": 0.0, "sparse": 0.0}
    jobs = []
    original_batch, original_start = bi.ActivationSource.batch, pc.start_static_features

    def start_static_features(**kwargs):
        jobs.append(original_start(**kwargs))
        return jobs[-1]

    def measured(self, tokens, start, stop):
        # The baselines on this very batch, while the build's background work is held (so it
        # gets only the idle CPU of the build's own batches, as in a real build).
        jobs[0].pause_background()
        ids = torch.from_numpy(np.ascontiguousarray(tokens[start:stop])).long()
        with torch.inference_mode():
            t0 = time.perf_counter()
            lm.run_to_hook(ids, HOOK)
            t1 = time.perf_counter()
            acts = lm.run_to_hook(ids, HOOK).to(torch.float16).float()
            t_enc = time.perf_counter()
            sae.encode_sparse(acts)
            t2 = time.perf_counter()
            if start // (stop - start) % 4 == 0:  # the dense encode, on every 4th batch
                sae.encode(acts)
                extra["dense"] += time.perf_counter() - t2
                extra["sparse"] += t2 - t_enc
            t3 = time.perf_counter()
        extra["hook"] += t1 - t0
        extra["hook_encode"] += t2 - t1
        jobs[0].resume_background()
        out = original_batch(self, tokens, start, stop)
        extra["measuring"] = extra.get("measuring", 0.0) + t3 - t0
        return out

    original_feed = FeatureAccumulators.feed

    def timed_feed(self, batch):
        # The bookkeeping alone: top windows, interval samples, statistics of one batch.
        t0, c0 = time.perf_counter(), time.thread_time()
        out = original_feed(self, batch)
        extra["bookkeeping"] = extra.get("bookkeeping", 0.0) + time.perf_counter() - t0
        extra.setdefault("bookkeeping_cpu", []).append((batch.counted.size,
                                                        time.thread_time() - c0))
        return out

    bi.ActivationSource.batch, pc.start_static_features = measured, start_static_features
    FeatureAccumulators.feed = timed_feed
    try:
        result, db = build_once(sae_dir=sae_dir, tokens=args.tokens, work=work, eval_tokens=0,
                                lm=lm, sae=sae)
    finally:
        bi.ActivationSource.batch, pc.start_static_features = original_batch, original_start
        FeatureAccumulators.feed = original_feed
    t = result.timings
    stream = t["stream"] - extra["measuring"]
    pipeline_s = stream + t["finalize"] + t["write"]
    fixed = t["finalize"] + t["write"]
    n = result.n_tokens
    return {
        "tokens": n,
        "bare_run_to_hook_tok_s": n / extra["hook"],
        "run_to_hook_plus_encode_tok_s": n / extra["hook_encode"],
        "dense_vs_sparse_encode": extra["dense"] / max(extra["sparse"], 1e-9),
        "pipeline_tok_s": n / pipeline_s,
        "pipeline_stream_only_tok_s": n / stream,
        "bookkeeping_tok_s": n / extra["bookkeeping"],
        "bookkeeping_cpu_tok_s": n / sum(c for _, c in extra["bookkeeping_cpu"]),
        # The first batch also touches the state's memory for the first time (a fixed cost of
        # the build, O(d_sae)); the rest is the per-token rate of a long build.
        "bookkeeping_cpu_after_first_tok_s": sum(t for t, _ in extra["bookkeeping_cpu"][1:])
        / max(sum(c for _, c in extra["bookkeeping_cpu"][1:]), 1e-9),
        "ratio_pipeline_vs_hook_encode": extra["hook_encode"] / pipeline_s,
        "ratio_stream_vs_hook_encode": extra["hook_encode"] / stream,
        "prepare_s": t["prepare"], "stream_s": stream, "finalize_s": t["finalize"],
        "write_s": t["write"],
        "finalize_parts_s": {k: t[k] for k in ("finalize_stats", "static_wait", "records")},
        "static_units": (int(t["static_units_background"]), int(t["static_units_total"])),
        # The ratio at other budgets if the per-token and fixed seconds held.
        "ratio_at": {m: (extra["hook_encode"] / n * m) / (stream / n * m + fixed)
                     for m in (32768, 100_000, 200_000)},
        "db_bytes_per_feature": db_bytes(db) / D_SAE,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None,
                        help="default: saescope build's own default")
    parser.add_argument("--rss-tokens", default="100000,400000")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sae", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokens is None:
        args.tokens = cli_default_tokens()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory(prefix="saescope-bench-") as tmp:
        work = Path(tmp)
        sae_dir = make_sae(work / "sae-16k-random")
        print(f"model {MODEL}, hook {HOOK}, random TopK SAE d_sae={D_SAE} k={K} "
              f"(no trained 16k SAE here), torch threads {torch.get_num_threads()}", flush=True)
        if not args.skip_speed:
            out = speed(args, sae_dir, work)
            bg, total = out["static_units"]
            print(f"tokens                         {out['tokens']}")
            print(f"bare run-to-hook               {out['bare_run_to_hook_tok_s']:8.0f} tok/s")
            print(f"run-to-hook + SAE encode       "
                  f"{out['run_to_hook_plus_encode_tok_s']:8.0f} tok/s   (encode_sparse; "
                  f"the dense encode takes {out['dense_vs_sparse_encode']:.2f}x as long)")
            print(f"pipeline (stream+final+write)  {out['pipeline_tok_s']:8.0f} tok/s")
            print(f"pipeline stream only           {out['pipeline_stream_only_tok_s']:8.0f} tok/s"
                  f"   (ratio {out['ratio_stream_vs_hook_encode']:.3f})")
            print(f"bookkeeping (accumulators)     {out['bookkeeping_tok_s']:8.0f} tok/s   "
                  "(top windows, interval samples, statistics of the sparse records; "
                  f"{out['bookkeeping_cpu_tok_s']:.0f} tok/s of its thread's CPU time, "
                  "which other load on the host disturbs far less; "
                  f"{out['bookkeeping_cpu_after_first_tok_s']:.0f} after the first batch, "
                  "which first touches the state's memory)")
            print(f"ratio pipeline / (hook+encode) {out['ratio_pipeline_vs_hook_encode']:8.3f}"
                  "   (target >= 0.90)")
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in out["finalize_parts_s"].items())
            print(f"prepare (load corpus, tokenize) {out['prepare_s']:.1f} s, stream "
                  f"{out['stream_s']:.1f} s, finalize {out['finalize_s']:.1f} s ({parts}), "
                  f"DB write {out['write_s']:.1f} s")
            print(f"static features: {bg} of {total} units done by the background worker "
                  f"before the stream ended; DB bytes/feature {out['db_bytes_per_feature']:.0f}")
            print("ratio at other budgets if these per-token and fixed seconds held: "
                  + ", ".join(f"{m}: {r:.3f}" for m, r in out["ratio_at"].items()), flush=True)
        for n in [int(x) for x in args.rss_tokens.split(",") if x]:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", "--tokens", str(n), "--sae",
                 str(sae_dir), "--work", str(work)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"build at {n} tokens failed:\n{proc.stderr[-3000:]}")
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            stream = res["timings"]["stream"]
            print(f"build {res['tokens']:7d} tokens: peak RSS {res['peak_rss_mb']:7.0f} MB, "
                  f"stream {res['tokens'] / stream:6.0f} tok/s, wall {res['wall_s']:.0f} s, "
                  f"DB {res['db_bytes'] / D_SAE:.0f} bytes/feature", flush=True)


if __name__ == "__main__":
    main()
