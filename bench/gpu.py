"""GPU checks in one run: device speed and memory, and the device build against the CPU build.

    .venv/bin/python bench/gpu.py [--device cuda[:N]] [--dtype float32] [--tokens 32768]
    .venv/bin/python bench/gpu.py --device cpu      # self-check: two CPU builds compared

Model smollm2-135m (--model) at its default hook, a RANDOM TopK SAE (--d-sae 16384, k 32), the
first --tokens text tokens of python-docs (--corpus), no activation cache, no held-out eval.

1. Speed: the same batches run to the hook + ``SAE.encode_sparse`` on the CPU and on the device
   (tokens/s, each after one warm-up batch; CUDA synchronised before every clock read), then one
   whole build on each (``compute_records``; tokens/s over the stream + finalize, tokenizing
   excluded since both builds tokenize the same way). Peak device memory:
   ``torch.cuda.max_memory_allocated`` over the device build.
2. Agreement: the device build against the CPU build, on the same tokens (checked equal):
   statistics within 1e-4 relative; top windows and interval samples the same, except where
   activations tie within 1e-4 relative (see ``compare_windows``).

Exits 2 with one line when --device asks for CUDA and torch sees none. With --device cpu the
"device" build is a second CPU build, so the comparison code runs (and must find no difference)
on a machine without a GPU. Exit status 1 when the builds disagree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RTOL = 1e-4
STAT_FIELDS = ("count", "act_sum", "max_act", "frac_nonzero", "hist_counts", "band_share",
               "band_count", "logit_pos_values", "logit_neg_values", "neighbour_cos")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_sae(folder: Path, *, model: str, hook: str, d_in: int, d_sae: int, k: int) -> Path:
    from app.engine.sae import SAE, SAEConfig

    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k, hook_name=hook,
                    model_name=model, context_size=128)
    return SAE.from_config(cfg, seed=0).save(folder)


def hook_encode_rate(lm, sae, hook: str, tokens: np.ndarray, *, batch: int) -> float:  # noqa: ANN001
    """Tokens/s of run-to-hook + encode_sparse over ``tokens`` [n_seq, ctx] (float32 into the SAE,
    values and indices back on the CPU, as the pipeline has them)."""
    from app.pipeline.build_inputs import ActivationSource

    source = ActivationSource(lm=lm, hook_name=hook, cache=None, device=sae.device)
    with torch.inference_mode():
        values, indices = sae.encode_sparse(source.batch(tokens, 0, batch))  # warm-up
        values.cpu(), indices.cpu()
        sync(sae.device)
        t0 = time.perf_counter()
        for s in range(0, len(tokens), batch):
            values, indices = sae.encode_sparse(source.batch(tokens, s, s + batch))
            values.cpu(), indices.cpu()
        sync(sae.device)
    return tokens.size / (time.perf_counter() - t0)


def timed_build(opts, *, lm, sae):  # noqa: ANN001, ANN201
    """(records, seconds of the build after tokenizing) of one in-memory build."""
    import app.pipeline.precompute as precompute

    marks: dict[str, float] = {}
    tokenize = precompute.tokenize

    def tokenize_and_mark(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        out = tokenize(*args, **kwargs)
        marks["tokenized"] = time.perf_counter()
        return out

    precompute.tokenize = tokenize_and_mark
    try:
        records, _ = precompute.compute_records(opts, lm=lm, sae=sae, log=lambda m: None)
        sync(sae.device)
    finally:
        precompute.tokenize = tokenize
    return records, time.perf_counter() - marks["tokenized"]


def rel_close(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b) <= RTOL * np.maximum(np.abs(a), np.abs(b)) + 1e-12


def compare_stats(ref, dev) -> list[str]:  # noqa: ANN001
    """FeatureArrays fields that differ by more than 1e-4 relative (ids of logits and
    neighbours are compared through their values: tied values may swap ids)."""
    problems = []
    for name in STAT_FIELDS:
        a, b = getattr(ref, name), getattr(dev, name)
        if a.shape != b.shape:
            problems.append(f"{name}: shape {a.shape} vs {b.shape}")
            continue
        bad = ~rel_close(a, b)
        if bad.any():
            i = np.argwhere(bad)[0]
            problems.append(f"{name}: {int(bad.sum())} of {bad.size} differ > {RTOL} relative "
                            f"(first at {tuple(int(x) for x in i)}: {a[tuple(i)]} vs "
                            f"{b[tuple(i)]})")
    return problems


def _groups(w) -> dict[tuple[int, int, int], dict[tuple[int, int], float]]:  # noqa: ANN001
    """(feature, kind, band) -> {(sequence, start): max value} of WindowArrays."""
    out: dict[tuple[int, int, int], dict[tuple[int, int], float]] = {}
    for f, k, b, s, st, v in zip(w.feature.tolist(), w.kind.tolist(), w.band.tolist(),
                                 w.seq_index.tolist(), w.start.tolist(), w.max_value.tolist(),
                                 strict=True):
        out.setdefault((f, k, b), {})[(s, st)] = v
    return out


def _near_any(value: float, others: list[float]) -> bool:
    return any(abs(value - o) <= RTOL * max(abs(value), abs(o)) for o in others)


def compare_windows(ref, dev, *, ref_max: np.ndarray, n_bands: int) -> tuple[list[str], int]:  # noqa: ANN001
    """Problems, and how many groups differ only through ties.

    A top-window group (feature, top) may differ only where a window in one build and not the
    other has a max value within 1e-4 relative of a value in the other build's list (a tie,
    ordered either way). An interval group (feature, band) may differ only where a differing
    sample lies within 1e-4 relative of one of the feature's band edges (an activation on an
    edge may fall either side; one that enters a band can displace a sample far from the edge,
    so the group is accepted when any of its differing samples is on an edge)."""
    from app.records import WINDOW_KIND_TOP, band_edge_values

    a, b = _groups(ref), _groups(dev)
    problems, tied = [], 0
    for key in sorted(set(a) | set(b)):
        wa, wb = a.get(key, {}), b.get(key, {})
        if wa.keys() == wb.keys():
            same = all(rel_close(wa[p], wb[p]) for p in wa)
            if not same:
                problems.append(f"windows {key}: same windows, values differ > {RTOL}")
            continue
        only_a = [wa[p] for p in wa.keys() - wb.keys()]
        only_b = [wb[p] for p in wb.keys() - wa.keys()]
        feature, kind, _ = key
        if kind == WINDOW_KIND_TOP:
            ok = all(_near_any(v, list(wb.values())) for v in only_a) and \
                all(_near_any(v, list(wa.values())) for v in only_b)
        else:
            edges = band_edge_values(float(ref_max[feature]), n_bands=n_bands)
            ok = any(_near_any(v, edges) for v in only_a + only_b)
        if ok:
            tied += 1
        else:
            problems.append(f"windows {key}: {len(only_a)} only in the CPU build "
                            f"({sorted(only_a)[:3]}), {len(only_b)} only in the device build "
                            f"({sorted(only_b)[:3]}), not ties within {RTOL}")
    return problems, tied


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (self-check)")
    ap.add_argument("--dtype", default="float32", help="the device build's model forward dtype")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", default=None, help="default: the model preset's")
    ap.add_argument("--corpus", default="python-docs")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    from app.engine.devices import resolve_device, resolve_dtype
    from app.engine.loading import load_model
    from app.engine.presets import find_preset
    from app.engine.sae import SAE
    from app.errors import ConfigError
    from app.pipeline.precompute import BuildOptions

    try:
        device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    except ConfigError as exc:
        print(f"bench/gpu.py: {exc}", file=sys.stderr)
        return 2
    if args.device.strip().lower() == "auto" and device.type == "cpu":
        print("bench/gpu.py: no CUDA GPU here; run it where torch.cuda.is_available() is true, "
              "or pass --device cpu for the self-check", file=sys.stderr)
        return 2
    self_check = device.type == "cpu"
    work = Path(tempfile.mkdtemp(prefix="saescope-gpu-bench-"))
    cache = work / "cache"
    preset = find_preset(args.model)
    hook = args.hook or (preset.default_hook if preset else "blocks.0.hook_resid_post")

    lm_cpu = load_model(args.model, cache_dir=cache)
    sae_dir = make_sae(work / "sae", model=lm_cpu.model_id, hook=hook, d_in=lm_cpu.d_model,
                       d_sae=args.d_sae, k=args.k)
    opts = BuildOptions(sae_path=sae_dir, model=args.model, corpus=args.corpus,
                        n_tokens=args.tokens, batch_size=args.batch_size, eval_tokens=0,
                        use_activation_cache=False, progress=False, db_url="sqlite://",
                        cache_dir=cache)
    lm_dev = load_model(args.model, device=device, dtype=dtype, cache_dir=cache)
    sae_cpu, sae_dev = SAE.load(sae_dir).eval(), SAE.load(sae_dir, device=device).eval()
    print(f"model {lm_cpu.model_id} at {hook}; random TopK SAE d_sae {args.d_sae}, k "
          f"{args.k}; {args.tokens:,} tokens of {args.corpus}; device {device} in "
          f"{args.dtype}{' (self-check: a second CPU build)' if self_check else ''}")

    # Each build its own checkpoint folder: a float32 device build has the CPU build's run key
    # and would otherwise resume from its finished checkpoint instead of computing anything.
    ref, ref_s = timed_build(replace(opts, cache_dir=work / "ckpt-cpu"), lm=lm_cpu, sae=sae_cpu)
    if not self_check:
        torch.cuda.reset_peak_memory_stats(device)
    dev, dev_s = timed_build(replace(opts, cache_dir=work / "ckpt-dev"), lm=lm_dev, sae=sae_dev)
    peak = torch.cuda.max_memory_allocated(device) if not self_check else 0
    tokens = ref.sequences.tokens
    if not np.array_equal(tokens, dev.sequences.tokens):
        print("FAIL: the two builds read different tokens", file=sys.stderr)
        return 1
    n_tok = tokens.size
    rate_cpu = hook_encode_rate(lm_cpu, sae_cpu, hook, tokens, batch=args.batch_size)
    rate_dev = hook_encode_rate(lm_dev, sae_dev, hook, tokens, batch=args.batch_size)
    print(f"run-to-hook + encode: cpu {rate_cpu:,.0f} tok/s, {device} {rate_dev:,.0f} tok/s "
          f"({rate_dev / rate_cpu:.1f}x)")
    print(f"pipeline (stream + finalize): cpu {n_tok / ref_s:,.0f} tok/s, {device} "
          f"{n_tok / dev_s:,.0f} tok/s; pipeline / hook+encode on {device}: "
          f"{n_tok / dev_s / rate_dev:.3f}")
    if not self_check:
        print(f"peak GPU memory (device build): {peak / 2**20:,.0f} MiB")

    problems = compare_stats(ref.features, dev.features)
    n_bands = int(ref.run.config["n_bands"])
    window_problems, tied = compare_windows(ref.windows, dev.windows,
                                            ref_max=ref.features.max_act, n_bands=n_bands)
    problems += window_problems
    print(f"agreement: statistics of {len(ref.features.count):,} features, "
          f"{len(ref.windows.feature):,} windows; {tied} window groups differ only by ties")
    for line in problems[:20]:
        print("  " + line)
    if problems:
        print(f"FAIL: {len(problems)} disagreements beyond {RTOL} relative", file=sys.stderr)
        return 1
    print("OK: the device build matches the CPU build")
    return 0


if __name__ == "__main__":
    sys.exit(main())
