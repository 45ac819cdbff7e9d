"""Benchmark: run_to_hook (stopped after one layer) against the full forward, tokens/s and ratio.

    .venv/bin/python bench/engine.py [--model smollm2-135m] [--layer 15] [--batch 8] [--ctx 128]

Both paths run on the same batches, interleaved, so load from other processes on a shared
machine hits them alike; the ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from app.engine.lm import LanguageModel  # noqa: E402
from app.engine.loading import load_model  # noqa: E402
from app.settings import get_settings  # noqa: E402


def sample_batch(lm: LanguageModel, *, batch: int, ctx: int) -> torch.Tensor:
    """Real text (the pydoc topics that ship with Python) cut into BOS-prefixed rows."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = lm.tokenize(text, prepend_bos=False)
    need = batch * (ctx - 1)
    if len(ids) < need:
        raise SystemExit(f"not enough text for {batch} x {ctx} tokens")
    rows = [[lm.bos_token_id, *ids[i * (ctx - 1) : (i + 1) * (ctx - 1)]] for i in range(batch)]
    return torch.tensor(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    start = time.perf_counter()
    lm = load_model(args.model, cache_dir=get_settings().cache_dir)
    print(
        f"load_model({args.model!r}): {time.perf_counter() - start:.1f} s "
        f"(after imports; {lm.n_layers} layers, torch threads {torch.get_num_threads()})"
    )
    ids = sample_batch(lm, batch=args.batch, ctx=args.ctx)
    hook = f"blocks.{args.layer}.hook_resid_post"
    n_tokens = ids.numel()

    runs = {
        f"run_to_hook({hook})": lambda: lm.run_to_hook(ids, hook),
        "full forward (logits)": lambda: lm.logits(ids),
    }
    for fn in runs.values():  # warm-up: first calls allocate and pick kernels
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)

    rates = {name: n_tokens / statistics.median(s) for name, s in seconds.items()}
    print(f"{args.repeats} repeats of {args.batch} x {args.ctx} = {n_tokens} tokens (median):")
    for name, rate in rates.items():
        print(f"  {name:40s} {rate:9.0f} tokens/s")
    hook_rate, full_rate = rates.values()
    print(
        f"  ratio run_to_hook / full forward: {hook_rate / full_rate:.2f}x "
        f"(layers run: {args.layer + 1} of {lm.n_layers}, no lm_head)"
    )


if __name__ == "__main__":
    main()
