"""What a Ray worker of a sharded build runs: one shard of the corpus, or a group of static units.

Plain functions (``sharded.py`` wraps them in ``ray.remote``), so they import without Ray and
the same code a one-process build runs does the work: ``load_inputs``, ``feed_batch``,
``FeatureAccumulators``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from app.pipeline.build_options import BuildOptions


class ShardProgress:
    """A Ray actor: tokens done per shard (a retried shard starts again from 0), read by the
    driver's progress bar."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}

    def start(self, shard: int) -> None:
        self.done[shard] = 0

    def add(self, shard: int, n: int) -> None:
        self.done[shard] = self.done.get(shard, 0) + n

    def total(self) -> int:
        return sum(self.done.values())


def run_shard(*, opts: BuildOptions, shard: int, tokens: np.ndarray, special_mask: np.ndarray,
              start: int, stop: int, cache_folder: str | None, threads: int,
              progress: Any = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Sequences [start, stop) of the build's tokens through the model (or the activation cache
    when the driver found one and this machine has it), the SAE and fresh accumulators; returns
    the accumulator state (``FeatureAccumulators.state_dict``) and the seconds spent loading
    and streaming. Batches start at ``start`` in steps of the build's batch size, as the
    one-process build cuts them."""
    import time

    import torch

    from app.pipeline.batches import feed_batch, new_accumulators
    from app.pipeline.build_inputs import ActivationSource, load_inputs

    torch.set_num_threads(max(1, threads))
    if progress is not None:
        progress.start.remote(shard)
    t0 = time.perf_counter()
    lm, sae, hook, _, _ = load_inputs(opts, lambda message: None)
    cache = None
    if cache_folder and (Path(cache_folder) / "complete.json").exists():
        from app.pipeline.activations import open_cache

        cache = open_cache(Path(cache_folder))
    source = ActivationSource(lm=lm, hook_name=hook, cache=cache, device=sae.device)
    ctx = int(tokens.shape[1])
    acc = new_accumulators(int(sae.cfg.d_sae), ctx=ctx, opts=opts)
    t1 = time.perf_counter()
    for s in range(start, stop, opts.batch_size):
        e = min(s + opts.batch_size, stop)
        feed_batch(acc=acc, sae=sae, source=source, tokens=tokens, special_mask=special_mask,
                   start=s, stop=e)
        if progress is not None:
            progress.add.remote(shard, (e - s) * ctx)
    state = acc.state_dict()
    return state, {"load": t1 - t0, "stream": time.perf_counter() - t1}


def run_static_units(meta: dict[str, int], inputs: dict[str, np.ndarray], unit_ids: list[int],
                     threads: int) -> Any:
    """A group of static-feature units (``static_features.run_units``)."""
    from app.pipeline.static_features import run_units

    return run_units(meta, inputs, unit_ids, threads=threads)
