"""Benchmark: one-process build vs the same build in 2 shards on a local Ray, on this machine.

    .venv/bin/python bench/distributed.py [--tokens 16384] [--d-sae 4096] [--shards 2]

Model smollm2-135m at blocks.15.hook_resid_post; a RANDOM TopK SAE (k 32; no trained SAE of
every width exists here, and feature content does not change the costs). python-docs, held-out
evaluation off (it runs on the driver in both modes), no activation cache (both modes run the
model). Each mode runs in a fresh subprocess, one after the other:

- one process: ``saescope build`` as today (2 torch threads, the static features in the idle
  worker);
- sharded: Ray started first on 2 CPUs (its start is timed on its own), then the build with
  ``--shards``: each shard a Ray task with 1 CPU that loads the model and SAE, streams its
  sequences and returns its state; the static features as Ray tasks after them.

Printed: tokens/s of the stream (model + SAE + accumulators; for the sharded build, from
submitting the shards to the last state merged, static features included) and end to end;
per shard, the seconds to load the model and SAE in the worker, its own stream tokens/s, the
driver's save + merge and the state's size, and so the fixed cost per shard (load + save and
merge; Ray's start is once per build); the difference of the two streams (on an idle machine
what sharding costs; on a shared one, skewed by how the scheduler shares the cores); peak RSS
(VmHWM) of the driver, of each Ray worker process and of Ray's own processes (GCS, raylet, ...),
sampled from /proc. On a shared machine the figures hold for that one run: say so when quoting.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL, HOOK, K = "smollm2-135m", "blocks.15.hook_resid_post", 32


def make_sae(folder: Path, d_sae: int) -> Path:
    from app.engine.sae import SAE, SAEConfig

    if not (folder / "cfg.json").exists():
        cfg = SAEConfig(architecture="topk", d_in=576, d_sae=d_sae, k=K, hook_name=HOOK,
                        model_name=MODEL, context_size=128)
        SAE.from_config(cfg, seed=0).save(folder)
    return folder


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, MB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def ray_processes() -> dict[int, str]:
    """pid -> 'worker' or 'ray' for this user's Ray processes (workers run default_worker.py;
    idle and busy workers rename themselves 'ray::...')."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "default_worker.py" in cmd or cmd.startswith("ray::"):
            out[int(d.name)] = "worker"
        elif any(name in cmd for name in ("gcs_server", "raylet", "ray/_private",
                                          "dashboard", "log_monitor", "runtime_env")):
            out[int(d.name)] = "ray"
    return out


class RaySampler(threading.Thread):
    """Peak RSS of every Ray process seen while the build runs (polled every 0.5 s)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()

    def sample(self) -> None:
        for pid, kind in ray_processes().items():
            mb = peak_rss_mb(pid)
            if mb > self.peaks.get(pid, (kind, 0.0))[1]:
                self.peaks[pid] = (kind, mb)

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.sample()


def child(args: argparse.Namespace) -> None:
    """One build in this process; a JSON line with its timings and peak RSS."""
    from app.pipeline.precompute import BuildOptions, build

    work = Path(args.work)
    opts = BuildOptions(sae_path=Path(args.sae), model=MODEL, n_tokens=args.tokens,
                        batch_size=16, db_url=f"sqlite:///{work / f'{args.mode}.db'}",
                        cache_dir=Path(args.cache), use_activation_cache=False, eval_tokens=0,
                        progress=False, sae_id=f"bench-{args.mode}",
                        shards=args.shards if args.mode == "sharded" else 0)
    out: dict = {"mode": args.mode}
    sampler = None
    if args.mode == "sharded":
        from app.pipeline.sharded import connect

        t = time.perf_counter()
        connect(num_cpus=os.cpu_count())
        out["ray_start_s"] = time.perf_counter() - t
        sampler = RaySampler()
        sampler.start()
    t = time.perf_counter()
    result = build(opts, log=lambda m: None)
    out["wall_s"] = time.perf_counter() - t
    if sampler is not None:
        sampler.sample()  # the workers are still alive: their VmHWM is their peak
        sampler.stop.set()
        out["workers_mb"] = sorted((mb for kind, mb in sampler.peaks.values()
                                    if kind == "worker"), reverse=True)
        out["ray_system_mb"] = sum(mb for kind, mb in sampler.peaks.values() if kind == "ray")
        from app.pipeline.sharded import require_ray

        require_ray().shutdown()
    out["driver_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["tokens"] = result.n_tokens
    out["timings"] = result.timings
    print(json.dumps(out))


def run_mode(mode: str, args: argparse.Namespace, *, sae: Path, work: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--tokens", str(args.tokens),
         "--shards", str(args.shards), "--sae", str(sae), "--work", str(work),
         "--cache", str(args.cache)],
        capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    if proc.returncode != 0:
        raise SystemExit(f"{mode} build failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--child", choices=("one", "sharded"), help=argparse.SUPPRESS)
    parser.add_argument("--sae", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help="data folder cache (dequantized model); default: "
                        "the settings' cache")
    args = parser.parse_args()
    if args.cache is None:
        from app.settings import get_settings

        args.cache = str(get_settings().cache_dir)
    if args.child:
        args.mode = args.child
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="saescope-bench-dist-") as tmp:
        work = Path(tmp)
        sae = make_sae(work / "sae", args.d_sae)
        print(f"model {MODEL}, random TopK SAE d_sae={args.d_sae} k={K}, {args.tokens} tokens, "
              f"{os.cpu_count()} CPUs; one process, then {args.shards} shards on local Ray",
              flush=True)
        one = run_mode("one", args, sae=sae, work=work)
        sh = run_mode("sharded", args, sae=sae, work=work)
    report(one, sh, shards=args.shards)
    print(json.dumps({"one": one, "sharded": sh}))


def report(one: dict, sh: dict, *, shards: int) -> None:
    n, t1, ts = one["tokens"], one["timings"], sh["timings"]
    print(f"one process: stream {n / t1['stream']:7.0f} tok/s ({t1['stream']:.1f} s), end to "
          f"end {n / one['wall_s']:6.0f} tok/s ({one['wall_s']:.1f} s: prepare "
          f"{t1['prepare']:.1f} s, finalize {t1['finalize']:.1f} s, write {t1['write']:.1f} s), "
          f"peak RSS {one['driver_mb']:.0f} MB")
    print(f"{shards} shards:    stream {n / ts['stream']:7.0f} tok/s ({ts['stream']:.1f} s, "
          f"static features {ts['static_after_shards']:.1f} s of it after the shards), end to "
          f"end {n / sh['wall_s']:6.0f} tok/s ({sh['wall_s']:.1f} s; Ray start "
          f"{sh['ray_start_s']:.1f} s before it)")
    per_shard_tok = n / shards / ts["shard_stream_max"]
    fixed = ts["shard_load_max"] + ts["shard_merge"] / shards
    print(f"per shard:   stream {per_shard_tok:.0f} tok/s (1 CPU; slowest shard), state "
          f"{ts['shard_state_mb_max']:.0f} MB; fixed cost {fixed:.1f} s = model + SAE load in "
          f"the worker {ts['shard_load_max']:.1f} s (slowest) + the driver's save and merge "
          f"{ts['shard_merge'] / shards:.1f} s (serial on the driver)")
    print(f"sharded stream - one-process stream: {ts['stream'] - t1['stream']:+.1f} s (both "
          "use every core; on a machine shared with other jobs two processes get a larger "
          "share of it than one, so this difference is not the cost of sharding)")
    workers = ", ".join(f"{mb:.0f}" for mb in sh["workers_mb"])
    print(f"peak RSS:    driver {sh['driver_mb']:.0f} MB, Ray worker processes [{workers}] MB "
          f"(the shards' are the largest), Ray's own processes {sh['ray_system_mb']:.0f} MB "
          "in all")

if __name__ == "__main__":
    main()
