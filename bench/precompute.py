"""Benchmark: precompute pipeline tokens/s against bare run-to-hook and run-to-hook + SAE encode.

    .venv/bin/python bench/precompute.py [--tokens 32768] [--rss-tokens 100000,400000]

Model smollm2-135m at blocks.15.hook_resid_post; a RANDOM TopK SAE (d_sae 16384, k 32) since no
trained 16k SAE exists here (random weights give the same shapes, L0 and costs as a trained
one; feature content does not affect speed).

Speed: one `build` on the first --tokens tokens of python-docs. Before each pipeline batch the
same batch is also run (1) to the hook only and (2) to the hook + SAE encode, each timed on its
own, so load from other processes on this shared machine hits the three alike. Pipeline time =
the build's stream + finalize + database write, minus those two extra measurements (the model
forward and the encode inside it are the pipeline's own). The held-out evaluation is off here
(it is extra full forwards, reported by `saescope build`).

Token budget: 32768 by default, below `saescope build`'s own default (100000) and the demo's
(200000). The streaming costs grow with the tokens; the per-SAE ones (statistics finalize,
logit effects over the whole vocabulary, decoder neighbours, the database write) do not, so a
small budget is the harder case for the ratio, not a flattering one. The fixed seconds are
printed apart, with the ratio they would give at the CLI's default budget if the streaming
rates held (labelled as extrapolated; run with --tokens 100000 to measure it).

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
    import app.pipeline.precompute as pc
    from app.engine.lm import load_model
    from app.engine.sae import SAE

    lm = load_model(MODEL)
    sae = SAE.load(sae_dir).eval()
    extra = {"hook": 0.0, "hook_encode": 0.0}
    original = pc._Activations.batch

    def measured(self, tokens, start, stop):
        ids = torch.from_numpy(tokens[start:stop].copy()).long()
        with torch.inference_mode():
            t0 = time.perf_counter()
            lm.run_to_hook(ids, HOOK)
            t1 = time.perf_counter()
            sae.encode(lm.run_to_hook(ids, HOOK).to(torch.float16).float())
            t2 = time.perf_counter()
        extra["hook"] += t1 - t0
        extra["hook_encode"] += t2 - t1
        return original(self, tokens, start, stop)

    pc._Activations.batch = measured
    try:
        result, db = build_once(sae_dir=sae_dir, tokens=args.tokens, work=work, eval_tokens=0,
                                lm=lm, sae=sae)
    finally:
        pc._Activations.batch = original
    t = result.timings
    pipeline_s = t["stream"] + t["finalize"] + t["write"] - extra["hook"] - extra["hook_encode"]
    n = result.n_tokens
    # Per-token streaming seconds (own forward + encode + bookkeeping) and per-SAE fixed seconds,
    # to extrapolate the ratio to another budget at the same rates.
    stream_own = (t["stream"] - extra["hook"] - extra["hook_encode"]) / n
    fixed = t["finalize"] + t["write"]
    n_cli = cli_default_tokens()
    return {
        "tokens": n,
        "bare_run_to_hook_tok_s": n / extra["hook"],
        "run_to_hook_plus_encode_tok_s": n / extra["hook_encode"],
        "pipeline_tok_s": n / pipeline_s,
        "pipeline_stream_only_tok_s": n / (t["stream"] - extra["hook"] - extra["hook_encode"]),
        "ratio_pipeline_vs_hook_encode": extra["hook_encode"] / pipeline_s,
        "finalize_s": t["finalize"], "write_s": t["write"],
        "finalize_parts_s": {k: t[k] for k in ("finalize_stats", "logit_effects", "neighbours")
                             if k in t},
        "cli_tokens": n_cli,
        "ratio_extrapolated_cli": (extra["hook_encode"] / n * n_cli)
        / (stream_own * n_cli + fixed),
        "db_bytes_per_feature": db_bytes(db) / D_SAE,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--rss-tokens", default="100000,400000")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sae", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
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
            print(f"tokens                         {out['tokens']}")
            print(f"bare run-to-hook               {out['bare_run_to_hook_tok_s']:8.0f} tok/s")
            print(f"run-to-hook + SAE encode       "
                  f"{out['run_to_hook_plus_encode_tok_s']:8.0f} tok/s")
            print(f"pipeline (stream+final+write)  {out['pipeline_tok_s']:8.0f} tok/s")
            print(f"pipeline stream only           {out['pipeline_stream_only_tok_s']:8.0f} tok/s")
            print(f"ratio pipeline / (hook+encode) {out['ratio_pipeline_vs_hook_encode']:8.3f}"
                  "   (target >= 0.90)")
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in out["finalize_parts_s"].items())
            print(f"finalize {out['finalize_s']:.1f} s ({parts}), DB write {out['write_s']:.1f} s, "
                  f"DB bytes/feature {out['db_bytes_per_feature']:.0f}")
            print(f"ratio at {out['cli_tokens']} tokens (CLI default), extrapolated from these "
                  f"rates: {out['ratio_extrapolated_cli']:.3f}", flush=True)
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
