"""The same build cut into shards on Ray: shards run apart, their exact states merge on the driver.

``saescope build --shards N [--ray-address ADDR]``: the driver tokenizes the corpus once and cuts
its sequences into N contiguous shards at batch boundaries (a sequence never spans shards; the
global sequence index is kept, so records carry the positions a one-process build gives them,
and every batch is the one that build would run). Each shard is a Ray task
(``shard_worker.run_shard``) that loads the model and SAE once, streams its sequences and returns
its accumulator state through Ray's object store, so the driver needs no shared disk. The driver
keeps each finished shard's state in the build's checkpoint folder (``shards/``) and merges it
(``FeatureAccumulators.merge``: exact, associative and commutative), so the run is the one a
single process writes, whatever the number of shards or the order they finish in. A rerun after
the driver died loads the kept states and runs only the other shards; Ray retries a shard whose
worker died (``max_retries``). The static features (logit effects, decoder neighbours) are cut
into groups of their units, one Ray task each.

Ray starts locally (every core) unless ``--ray-address`` names a cluster; its usage reporting is
off (``RAY_USAGE_STATS_ENABLED=0``), so nothing leaves the machine. On a cluster every node needs
saescope (same version) and the model and SAE at the same paths, or a model preset installed.
Ctrl-C cancels the running shards (their workers are killed) and keeps the finished ones.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.errors import ConfigError, Interrupted, SaescopeError
from app.pipeline.batches import new_accumulators
from app.pipeline.build_options import BuildOptions, Log
from app.pipeline.checkpoint import Checkpoint

if TYPE_CHECKING:
    from app.engine.sae import SAE
    from app.pipeline.accumulators import FeatureAccumulators
    from app.pipeline.corpus import TokenizedCorpus
    from app.pipeline.static_features import StaticFeatures, StaticResult

RAY_VERSION = "2.60.0"
INSTALL_HINT = (f"--shards needs Ray, which is not installed: pip install 'saescope[distributed]' "
                f"(or pip install ray=={RAY_VERSION})")
MAX_RETRIES = 3  # Ray reruns a shard whose worker process died this many times


def require_ray() -> Any:
    """The ``ray`` module, with usage reporting off; ConfigError (one line) without it."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


def connect(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address``, or start Ray on this machine (``num_cpus``, default
    every core). Returns True when this call started it (the caller shuts it down); a session
    already open in this process is used as it is."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    import logging

    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    if address is None:
        # Local workers import this very copy of the code (a source checkout included).
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH"))
                                            if p)
    try:
        ray.init(address=address, num_cpus=None if address else (num_cpus or os.cpu_count()),
                 include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": env})
    except (ConnectionError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {first}") from None
    return True


def shard_bounds(n_seq: int, n_shards: int, batch_size: int) -> list[tuple[int, int]]:
    """Contiguous sequence ranges, as even as whole batches allow (fewer shards than asked
    when there are fewer batches)."""
    n_batches = -(-n_seq // batch_size)
    n = max(1, min(n_shards, n_batches))
    cuts = [min(round(i * n_batches / n) * batch_size, n_seq) for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def shard_checkpoint(folder: Path, key: str, shard: int, n_shards: int) -> Checkpoint:
    return Checkpoint(folder / "shards", key, name=f"{shard}-of-{n_shards}")


@dataclass
class ShardedRun:
    """What ``accumulate_sharded`` gives the build."""

    acc: FeatureAccumulators | None  # None: stopped early (``stop_after_shards``)
    static: StaticResult | None
    shards_total: int
    shards_run: list[int] = field(default_factory=list)


@dataclass
class _Build:
    """The driver's view of one sharded build."""

    corpus: TokenizedCorpus
    d_sae: int
    static: StaticFeatures
    ckpt: Checkpoint
    cache_folder: Path | None
    opts: BuildOptions
    timings: dict[str, float]
    bounds: list[tuple[int, int]]

    def shard_ckpt(self, i: int) -> Checkpoint:
        return shard_checkpoint(self.ckpt.folder, self.ckpt.key, i, len(self.bounds))

    def tokens(self, i: int) -> int:
        return (self.bounds[i][1] - self.bounds[i][0]) * self.corpus.context_size

    def accumulators(self, state: dict[str, np.ndarray] | None = None) -> FeatureAccumulators:
        acc = new_accumulators(self.d_sae, ctx=self.corpus.context_size, opts=self.opts)
        if state is not None:
            acc.load_state_dict(state)
        return acc


def accumulate_sharded(*, corpus: TokenizedCorpus, sae: SAE, static: StaticFeatures,
                       ckpt: Checkpoint, cache_folder: Path | None, opts: BuildOptions,
                       log: Log, timings: dict[str, float],
                       stop_after_shards: int | None = None) -> ShardedRun:
    """The merged accumulators of every shard, and the static features (``static``, not
    started in the background); stopped after ``stop_after_shards`` finished shards (tests:
    they are kept, as a kill would leave them). Shard timings go into ``timings``."""
    ray = require_ray()
    b = _Build(corpus=corpus, d_sae=int(sae.cfg.d_sae), static=static, ckpt=ckpt,
               cache_folder=cache_folder, opts=opts, timings=timings,
               bounds=shard_bounds(corpus.n_seq, opts.shards, opts.batch_size))
    n = len(b.bounds)
    if n < opts.shards:
        log(f"{n} shards, not {opts.shards}: the corpus has {corpus.n_seq} sequences in batches "
            f"of {opts.batch_size}")
    acc, todo = b.accumulators(), []
    for i, (_, stop) in enumerate(b.bounds):
        loaded = b.shard_ckpt(i).load()
        if loaded is not None and loaded[0] == stop:
            acc.merge(b.accumulators(loaded[1]))
        else:
            todo.append(i)
    if len(todo) < n:
        log(f"resuming: {n - len(todo)} of {n} shards finished earlier (kept in "
            f"{ckpt.folder / 'shards'}); running the other {len(todo)}")
    t = time.perf_counter()
    started = connect(opts.ray_address)
    timings["ray_start"] = time.perf_counter() - t
    run = ShardedRun(acc=acc, static=None, shards_total=n)
    try:
        _run(ray, b, run=run, todo=todo, log=log, stop_after_shards=stop_after_shards)
    finally:
        if started:
            ray.shutdown()
    return run


def _run(ray: Any, b: _Build, *, run: ShardedRun, todo: list[int], log: Log,
         stop_after_shards: int | None) -> None:
    from app.pipeline.shard_worker import ShardProgress, run_shard, run_static_units
    from app.pipeline.static_features import StaticPart

    n, ctx, acc = len(b.bounds), b.corpus.context_size, run.acc
    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_shard = max(1, cpus // max(1, len(todo)))
    # A CUDA build gives each shard one GPU (Ray sets CUDA_VISIBLE_DEVICES: "cuda" is it).
    from app.engine.devices import resolve_device

    gpus = 1 if resolve_device(b.opts.device).type == "cuda" else 0
    log(f"sharded build: {len(todo)} of {n} shards on Ray ({cpus} CPUs, {per_shard} per shard"
        + (", 1 GPU each)" if gpus else ")"))
    progress = ray.remote(num_cpus=0)(ShardProgress).remote()
    shard_task = ray.remote(run_shard).options(num_cpus=per_shard, num_gpus=gpus,
                                               max_retries=MAX_RETRIES)
    worker_opts = BuildOptions(**{**vars(b.opts), "progress": False,
                                  "device": "cuda" if gpus else "cpu"})
    tokens, mask = ray.put(b.corpus.tokens), ray.put(b.corpus.special_mask)
    cache = str(b.cache_folder) if b.cache_folder is not None else None
    pending = {shard_task.remote(opts=worker_opts, shard=i, tokens=tokens, special_mask=mask,
                                 start=b.bounds[i][0], stop=b.bounds[i][1], cache_folder=cache,
                                 threads=per_shard, progress=progress): i for i in todo}
    # The static features: their units in one group per shard, run as CPUs free up.
    meta, inputs = b.static.plan()
    inputs_ref = ray.put(inputs)
    unit_task = ray.remote(run_static_units).options(num_cpus=1, max_retries=MAX_RETRIES)
    groups = [g for g in np.array_split(np.arange(b.static.units_total), n) if g.size]
    static_refs = [unit_task.remote(meta, inputs_ref, [int(u) for u in g], 1) for g in groups]
    done_before = sum(b.tokens(i) for i in range(n) if i not in todo)
    bar = _bar(b.opts, total=b.corpus.n_seq * ctx, initial=done_before)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            if bar is not None:  # update() draws at most every mininterval
                bar.update(min(bar.total, done_before + ray.get(progress.total.remote())) - bar.n)
            for ref in ready:
                i = pending.pop(ref)
                state, took = _get(ray, ref, what=f"shard {i}")
                t = time.perf_counter()
                b.shard_ckpt(i).save(next_seq=b.bounds[i][1], state=state)
                acc.merge(b.accumulators(state))
                _note(b.timings, took, merge=time.perf_counter() - t,
                      state_mb=sum(a.nbytes for a in state.values()) / 2**20)
                run.shards_run.append(i)
                done_before += b.tokens(i)
            if stop_after_shards is not None and len(run.shards_run) >= stop_after_shards \
                    and pending:
                _cancel(ray, [*pending, *static_refs])
                run.acc = None
                return
        t = time.perf_counter()
        part = StaticPart()
        for ref in static_refs:
            part = part.merge(_get(ray, ref, what="static features"))
        b.timings["static_after_shards"] = time.perf_counter() - t
        run.static = b.static.finish_parts(part)
    except KeyboardInterrupt:
        _cancel(ray, [*pending, *static_refs])
        kept = n - len(pending)
        raise Interrupted(f"interrupted; {kept} of {n} shards are finished and kept in "
                          f"{b.ckpt.folder / 'shards'}: the same command runs only the other "
                          f"{n - kept}") from None
    except BaseException:
        _cancel(ray, [*pending, *static_refs])
        raise
    finally:
        if bar is not None:
            bar.close()


def _note(timings: dict[str, float], took: dict[str, float], **driver: float) -> None:
    """Per-shard seconds into the build's timings: the slowest shard's load and stream, the
    driver's save + merge summed over shards, the largest state."""
    for name, value in took.items():
        timings[f"shard_{name}_max"] = max(timings.get(f"shard_{name}_max", 0.0), value)
    timings["shard_merge"] = timings.get("shard_merge", 0.0) + driver["merge"]
    timings["shard_state_mb_max"] = max(timings.get("shard_state_mb_max", 0.0),
                                        driver["state_mb"])


def _bar(opts: BuildOptions, *, total: int, initial: int) -> Any:
    if not opts.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True,
                desc="precompute (sharded)", dynamic_ncols=True, mininterval=0.5)


def _get(ray: Any, ref: Any, *, what: str) -> Any:
    """ray.get, with a task's failure as one line (a SaescopeError raised in a worker, such as
    a model missing on that machine, as itself)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else None
        if isinstance(cause, SaescopeError):
            raise type(cause)(str(cause)) from None
        text = str(cause or exc).strip().splitlines()
        raise SaescopeError(f"{what} failed on Ray: {text[-1] if text else type(exc).__name__}; "
                            "finished shards are kept: the same command resumes") from None
    except ray.exceptions.RayError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SaescopeError(f"{what} failed on Ray: {first}; finished shards are kept: the "
                            "same command resumes") from None


def _cancel(ray: Any, refs: list[Any]) -> None:
    """Stop the tasks still running (force: their worker processes are killed)."""
    for ref in refs:
        with contextlib.suppress(Exception):  # a finished task cannot be cancelled
            ray.cancel(ref, force=True)
