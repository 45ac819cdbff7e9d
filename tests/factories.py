"""Test and benchmark data: synthetic precompute records, and databases written from them.

The one place tests and bench/serve.py build a database without running the pipeline
(`from tests.factories import synthetic_run, synthetic_database`). The records are like the
engine's tiny presets: real records with made-up numbers, built so that every invariant the
pipeline guarantees holds (window maxima match their values, top windows sorted, etc.).
`served_sae_database` is the database the model-call tests serve: tiny-llama and a random
TopK SAE saved in a folder, registered with no run (torch is imported only there).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Engine

from app.records import (
    WINDOW_KIND_INTERVAL,
    WINDOW_KIND_TOP,
    FeatureArrays,
    ModelRecord,
    RunRecord,
    SAERecord,
    SequenceArrays,
    WindowArrays,
    document_starts,
)
from app.store.db import make_engine, upgrade
from app.store.labels import LabelEdit, create_label
from app.store.writer import register_sae, write_run

if TYPE_CHECKING:
    from app.engine.lm import LanguageModel


@dataclass
class SyntheticRun:
    model: ModelRecord
    sae: SAERecord
    run: RunRecord
    sequences: SequenceArrays
    features: FeatureArrays
    windows: WindowArrays

    def as_kwargs(self) -> dict:
        return {"model": self.model, "sae": self.sae, "run": self.run,
                "sequences": self.sequences, "features": self.features, "windows": self.windows}


def synthetic_run(
    *,
    d_sae: int = 64,
    vocab_size: int = 100,
    n_seq: int = 40,
    context_size: int = 32,
    window_len: int = 16,
    n_top: int = 5,
    n_bands: int = 3,
    per_band: int = 2,
    n_bins: int = 20,
    n_logits: int = 5,
    n_neighbours: int = 4,
    n_dead: int = 3,
    model_id: str = "tiny-llama",
    sae_id: str = "1-res-topk-64",
    corpus: str = "synthetic",
    seed: int = 0,
    token_strings: list[str] | None = None,
    active_frac: float = 1.0,
    min_window_len: int | None = None,
    zipf_tokens: bool = False,
) -> SyntheticRun:
    """Records for one run; features [0, n_dead) are dead (no windows, zero stats).

    By default every token of a window is active and lengths run from window_len/2: tests want
    many values to check. `active_frac` (the share of a window's other tokens that are active),
    `min_window_len` and `zipf_tokens` (token ids drawn with frequency ~ 1/rank, as text has)
    let a benchmark match what a real run stores (bench/serve.py sets them from the demo run's
    windows).
    """
    rng = np.random.default_rng(seed)
    vocab = token_strings or [f"tok{i}" for i in range(vocab_size)]
    model = ModelRecord(model_id=model_id, source=model_id, architecture="llama", d_model=16,
                        n_layers=2, vocab_size=len(vocab), token_strings=vocab, bos_token_id=1)
    sae = SAERecord(model_id=model_id, sae_id=sae_id, hook_name="blocks.1.hook_resid_post",
                    architecture="topk", d_in=16, d_sae=d_sae, path=f"/nowhere/{sae_id}",
                    cfg={"architecture": "topk", "k": 8, "d_in": 16, "d_sae": d_sae})
    if zipf_tokens:
        ranks = np.arange(1, len(vocab) - 1, dtype=np.float64)
        order = rng.permutation(len(vocab) - 2) + 2
        tokens = rng.choice(order, size=(n_seq, context_size), p=(1 / ranks) / (1 / ranks).sum())
        tokens = tokens.astype(np.int32)
    else:
        tokens = rng.integers(2, len(vocab), size=(n_seq, context_size), dtype=np.int32)
    tokens[:, 0] = 1  # BOS
    seq_index = np.arange(n_seq, dtype=np.int64) * 3  # sparse on purpose: not row numbers
    sequences = packed_sequences(tokens, seq_index=seq_index, seed=seed)

    alive = np.arange(d_sae) >= n_dead
    max_act = np.where(alive, rng.uniform(0.5, 10.0, d_sae), 0.0).astype(np.float32)
    count = np.where(alive, rng.integers(1, 500, d_sae), 0).astype(np.int64)
    n_counted = 10_000
    act_sum = (count * max_act * rng.uniform(0.1, 0.5, d_sae)).astype(np.float64)
    edges = np.concatenate([[0.0], np.logspace(-3, 2, n_bins)])
    hist = np.zeros((d_sae, n_bins), np.int64)
    for f in np.flatnonzero(alive):
        hist[f] = np.bincount(rng.integers(0, n_bins, count[f]), minlength=n_bins)
    share = rng.dirichlet(np.ones(n_bands), d_sae).astype(np.float32) * alive[:, None]
    band_count = (share * count[:, None]).astype(np.int64)
    features = FeatureArrays(
        count=count, act_sum=act_sum, max_act=max_act, frac_nonzero=count / n_counted,
        hist_edges=edges, hist_counts=hist, band_share=share, band_count=band_count,
        logit_pos_ids=rng.integers(0, len(vocab), (d_sae, n_logits), dtype=np.int32),
        logit_pos_values=-np.sort(-rng.uniform(0, 2, (d_sae, n_logits))).astype(np.float32),
        logit_neg_ids=rng.integers(0, len(vocab), (d_sae, n_logits), dtype=np.int32),
        logit_neg_values=np.sort(-rng.uniform(0, 2, (d_sae, n_logits))).astype(np.float32),
        neighbour_idx=rng.integers(0, d_sae, (d_sae, n_neighbours), dtype=np.int32),
        neighbour_cos=-np.sort(-rng.uniform(0, 1, (d_sae, n_neighbours))).astype(np.float32),
    )

    rows: list[tuple] = []
    values: list[np.ndarray] = []
    for f in np.flatnonzero(alive):
        top_max = -np.sort(-rng.uniform(0.5, 1.0, n_top)) * max_act[f]
        top_max[0] = max_act[f]
        specs = [(WINDOW_KIND_TOP, -1, r, m) for r, m in enumerate(top_max)]
        for b in range(n_bands):
            lo, hi = b * max_act[f] / n_bands, (b + 1) * max_act[f] / n_bands
            specs += [(WINDOW_KIND_INTERVAL, b, r, rng.uniform(lo, hi)) for r in range(per_band)]
        for kind, band, rank, peak in specs:
            shortest = window_len // 2 if min_window_len is None else min_window_len
            length = int(rng.integers(shortest, window_len + 1))
            seq = int(rng.integers(0, n_seq))
            start = int(rng.integers(0, context_size - length + 1))
            v = np.zeros(window_len, np.float16)
            v[:length] = rng.uniform(0, peak * 0.9, length) * (rng.random(length) < active_frac)
            max_pos = int(rng.integers(0, length))
            v[max_pos] = peak
            rows.append((f, kind, band, rank, seq_index[seq], start, length, float(v[max_pos]),
                         max_pos))
            values.append(v)
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 9
    windows = WindowArrays(
        feature=np.array(cols[0], np.int32), kind=np.array(cols[1], np.int8),
        band=np.array(cols[2], np.int16), rank=np.array(cols[3], np.int16),
        seq_index=np.array(cols[4], np.int64), start=np.array(cols[5], np.int32),
        length=np.array(cols[6], np.int16), max_value=np.array(cols[7], np.float32),
        max_pos=np.array(cols[8], np.int16),
        values=np.stack(values) if values else np.zeros((0, window_len), np.float16),
    )
    n_tokens = n_seq * context_size
    run = RunRecord(
        corpus=corpus, n_tokens=n_tokens, n_tokens_counted=n_counted, context_size=context_size,
        window_len=window_len, n_top=n_top, n_bands=n_bands, config={"seed": seed},
        sae_stats={
            "l0_hist": {"edges": [0, 4, 8, 12], "counts": [3, 5, 2]},
            "density_hist": {"edges": [-4.0, -3.0, -2.0, -1.0], "counts": [10, 20, 5]},
            "n_dead": int(n_dead), "n_dense": int((features.frac_nonzero > 0.1).sum()),
            "mean_l0": 7.5, "explained_variance": 0.8, "ce_loss_recovered": 0.9,
        },
    )
    return SyntheticRun(model, sae, run, sequences, features, windows)


def packed_sequences(tokens: np.ndarray, *, seq_index: np.ndarray, seed: int = 0,
                     bos_id: int = 1) -> SequenceArrays:
    """Sequences as a packed build records them: documents follow one another, each later one
    opened by a BOS (written into `tokens`); every other sequence has a boundary, some a second.

    Its own random stream, so the packing leaves the rest of a synthetic run as it was.
    """
    rng = np.random.default_rng([seed, 1])
    n_seq, ctx = tokens.shape
    doc_ids = np.zeros((n_seq, ctx), np.int32)
    doc = 0
    for i in range(n_seq):
        cuts = sorted(rng.choice(np.arange(2, ctx - 1), size=1 + (i % 4 == 1), replace=False)
                      ) if i % 2 == 1 and ctx > 4 else []
        doc_ids[i] = doc
        for cut in cuts:
            doc += 1
            doc_ids[i, cut:] = doc
            tokens[i, cut] = bos_id
        if i % 3 == 2:  # the next sequence opens a new document with its own BOS
            doc += 1
    names = [f"doc{i}" for i in range(int(doc_ids.max()) + 1)]
    return SequenceArrays(seq_index=seq_index, doc_index=doc_ids[:, 0].astype(np.int64),
                          tokens=tokens, doc_names=names, doc_starts=document_starts(doc_ids))


def write_records(
    engine: Engine, *runs: SyntheticRun, labels: Iterable[dict[str, Any]] = ()
) -> None:
    """Write the runs, then the labels (each the keyword arguments of write_label)."""
    for run in runs:
        write_run(engine_or_session=engine, **run.as_kwargs())
    for label in labels:
        write_label(engine, **label)


def write_label(
    engine: Engine, *, sae_id: str, index: int, description: str, tags: list[str] | None = None,
    status: str = "draft", author: str = "ann", author_kind: str = "person",
    notes: str = "", confidence: float | None = None,
) -> Any:
    """One author's label, created through the store (app/store/labels)."""
    return create_label(engine, sae_id=sae_id, index=index, author=author,
                        author_kind=author_kind, edit=LabelEdit(
                            description=description, tags=list(tags or []), status=status,
                            notes=notes, confidence=confidence))


def synthetic_database(
    db_url: str, *runs: SyntheticRun, labels: Iterable[dict[str, Any]] = (), migrate: bool = True
) -> None:
    """The database at `db_url`, migrated (unless `migrate` is False: the caller did it), holding
    the runs and labels."""
    if migrate:
        upgrade(db_url)
    engine = make_engine(db_url)
    try:
        write_records(engine, *runs, labels=labels)
    finally:
        engine.dispose()


SERVED_SAE_ID = "2-res-topk-48"
SERVED_HOOK = "blocks.2.hook_resid_post"


def served_sae_database(home: Path, *, lm: LanguageModel | None = None, name: str = "engine.db"
                        ) -> tuple[Path, str]:
    """A database for the model-call tests (search, steering): tiny-llama and a random TopK SAE
    (48 latents, k 6, seed 3) at SERVED_HOOK saved under `home`/sae and registered as
    SERVED_SAE_ID, no precompute run. Returns (the SAE folder, the database URL)."""
    from app.engine.sae import SAE, SAEConfig
    from app.engine.tiny import build_tiny

    lm = lm or build_tiny("tiny-llama")
    d_sae = 48
    cfg = SAEConfig(architecture="topk", d_in=lm.d_model, d_sae=d_sae, k=6,
                    hook_name=SERVED_HOOK, model_name="tiny-llama")
    folder = home / "sae"
    SAE.from_config(cfg, seed=3).save(folder)
    url = f"sqlite:///{home / name}"
    upgrade(url)
    engine = make_engine(url)
    try:
        register_sae(
            engine_or_session=engine,
            model=ModelRecord(model_id=lm.model_id, source=str(lm.source),
                              architecture=lm.architecture, d_model=lm.d_model,
                              n_layers=lm.n_layers, vocab_size=lm.vocab_size,
                              token_strings=lm.token_strings(), bos_token_id=lm.bos_token_id),
            sae=SAERecord(model_id=lm.model_id, sae_id=SERVED_SAE_ID, hook_name=SERVED_HOOK,
                          architecture="topk", d_in=lm.d_model, d_sae=d_sae, path=str(folder)),
        )
    finally:
        engine.dispose()
    return folder, url


def engine_ready(app: Any, *, timeout: float = 120) -> None:
    """Wait until an app started with load_model has its model: the model loads on the model
    thread ahead of any job, so a job submitted now runs after it (no polling)."""
    app.state.model_worker.submit(lambda: None).result(timeout)
    state = app.state.engine_state
    assert state.status == "ready", state.message


@dataclass
class PlantedFeature:
    """A feature that fires exactly on its planted tokens: `weights[token id]` at every
    occurrence, 0 elsewhere; the token ids `before` are placed right before every occurrence."""

    index: int
    weights: dict[int, float]
    before: tuple[int, ...] = ()


def planted_values(plants: list[PlantedFeature], tokens: np.ndarray) -> dict[int, np.ndarray]:
    """Each planted feature's values on token ids [n, ctx] (float32), by its rule."""
    out = {}
    for plant in plants:
        lookup = np.zeros(int(tokens.max()) + 1, np.float32)
        for token, weight in plant.weights.items():
            if token < len(lookup):
                lookup[token] = weight
        out[plant.index] = lookup[tokens]
    return out


def planted_run(
    *, plants: list[PlantedFeature], vocab: list[str], occurrences: int = 40, n_seq: int = 60,
    context_size: int = 32, window_len: int = 12, n_top: int = 6, n_bands: int = 3,
    per_band: int = 3, d_sae: int = 16, n_dead: int = 1, seed: int = 0, **kwargs: Any,
) -> SyntheticRun:
    """A synthetic run whose planted features' stored windows follow their rule (planted_values)
    over the run's own sequences: top windows around the strongest occurrences (one per
    sequence), interval samples per band of the window max. Other features keep the random
    windows of synthetic_run. Token ids 0 and 1 are not planted (1 is BOS)."""
    run = synthetic_run(d_sae=d_sae, n_seq=n_seq, context_size=context_size,
                        window_len=window_len, n_top=n_top, n_bands=n_bands, per_band=per_band,
                        n_dead=n_dead, seed=seed, token_strings=vocab, **kwargs)
    rng = np.random.default_rng(seed + 1)
    special = {t for p in plants for t in [*p.weights, *p.before]}
    filler = np.array([t for t in range(2, len(vocab)) if t not in special])
    tokens = rng.choice(filler, size=(n_seq, context_size)).astype(np.int32)
    tokens[:, 0] = 1
    for plant in plants:
        planted = sorted(plant.weights)
        for k in range(occurrences):
            s = int(rng.integers(n_seq))
            p = int(rng.integers(1 + len(plant.before), context_size))
            tokens[s, p] = planted[k % len(planted)]
            tokens[s, p - len(plant.before):p] = plant.before
    run.sequences.tokens = tokens
    values = planted_values(plants, tokens)
    w = run.windows
    keep = ~np.isin(w.feature, [p.index for p in plants])
    cols = {name: [getattr(w, name)[keep]] for name in (
        "feature", "kind", "band", "rank", "seq_index", "start", "length", "max_value",
        "max_pos", "values")}
    for plant in plants:
        rows = _planted_windows(plant.index, values[plant.index], run.sequences.seq_index,
                                window_len=window_len, n_top=n_top, n_bands=n_bands,
                                per_band=per_band, rng=rng)
        for name, column in rows.items():
            cols[name].append(column)
        acts = values[plant.index]
        f = plant.index
        run.features.max_act[f] = acts.max()
        run.features.count[f] = int((acts > 0).sum())
        run.features.act_sum[f] = float(acts.sum())
        run.features.frac_nonzero[f] = run.features.count[f] / run.run.n_tokens_counted
    run.windows = WindowArrays(**{name: np.concatenate(parts) for name, parts in cols.items()})
    return run


def _planted_windows(feature: int, acts: np.ndarray, seq_index: np.ndarray, *, window_len: int,
                     n_top: int, n_bands: int, per_band: int, rng: np.random.Generator
                     ) -> dict[str, np.ndarray]:
    ctx = acts.shape[1]
    found = []  # (window max, seq row, start) of a window around every occurrence
    for s, p in zip(*np.nonzero(acts), strict=True):
        start = int(min(max(p - window_len // 2, 0), ctx - window_len))
        found.append((float(acts[s, start:start + window_len].max()), int(s), start))
    found.sort(key=lambda x: (-x[0], x[1], x[2]))
    chosen: list[tuple[int, int, int, int, int]] = []  # kind, band, rank, row, start
    seen_rows: set[int] = set()
    for _peak, s, start in found:
        if len(seen_rows) < n_top and s not in seen_rows:
            chosen.append((WINDOW_KIND_TOP, -1, len(seen_rows), s, start))
            seen_rows.add(s)
    peak_all = found[0][0] if found else 1.0
    for b in range(n_bands):
        lo, hi = b * peak_all / n_bands, (b + 1) * peak_all / n_bands
        pool = sorted({(s, start) for m, s, start in found
                       if lo <= m < hi or (b == n_bands - 1 and m == peak_all)})
        for r, i in enumerate(rng.permutation(len(pool))[:per_band]):
            chosen.append((WINDOW_KIND_INTERVAL, b, r, *pool[int(i)]))
    out: dict[str, list] = {k: [] for k in ("feature", "kind", "band", "rank", "seq_index",
                                            "start", "length", "max_value", "max_pos",
                                            "values")}
    for kind, band, rank, s, start in chosen:
        v = acts[s, start:start + window_len].astype(np.float16)
        for name, value in (("feature", feature), ("kind", kind), ("band", band),
                            ("rank", rank), ("seq_index", seq_index[s]), ("start", start),
                            ("length", window_len), ("max_value", float(v.max())),
                            ("max_pos", int(v.argmax())), ("values", v)):
            out[name].append(value)
    dtypes = {"feature": np.int32, "kind": np.int8, "band": np.int16, "rank": np.int16,
              "seq_index": np.int64, "start": np.int32, "length": np.int16,
              "max_value": np.float32, "max_pos": np.int16}
    arrays = {k: np.array(v, dtypes[k]) for k, v in out.items() if k != "values"}
    arrays["values"] = (np.stack(out["values"]) if out["values"]
                        else np.zeros((0, window_len), np.float16))
    return arrays


def explain_into(db_url: str, *, sae_id: str, indices: list[int], scorer: Any,
                 cache_dir: Any, n_sequences: int = 64) -> Any:
    """Scored automatic drafts in a built database, written by the real explain job: the pattern
    explainer, `scorer` (a scripted chat backend, e.g. tests/pipeline/autointerp/scripted.py's
    KeywordScorer) for detection and fuzzing, windows at zero from the run's stored sequences
    encoded with the SAE's own model (so the SAE's weights must exist). Returns the summary."""
    from app.pipeline.autointerp.explain_job import ExplainJob, FeatureSelection, run_explain
    from app.pipeline.autointerp.negatives import pool_from_store
    from app.pipeline.autointerp.pattern import explain_pattern

    engine = make_engine(db_url)
    try:
        job = ExplainJob(sae_id=sae_id, selection=FeatureSelection(sorted(indices)),
                         progress=False)
        return run_explain(
            engine, job, explain=explain_pattern, scorer=scorer, log=lambda _m: None,
            negatives=lambda: pool_from_store(engine, sae_id=sae_id, n_sequences=n_sequences,
                                              seed=0, cache_dir=cache_dir))
    finally:
        engine.dispose()


def word_corpus(folder: Path, words: list[str], *, n_docs: int = 12,
                lengths: tuple[int, int] | None = (20, 400), n_words: int = 200,
                name: str = "doc{i:02d}.txt", seed: int = 0) -> Path:
    """A folder of `n_docs` text files of words drawn from `words` (seeded): each of a length
    drawn from `lengths` (so packing and document boundaries occur), or of `n_words` words each
    when `lengths` is None."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_docs):
        size = rng.integers(*lengths) if lengths else n_words
        (folder / name.format(i=i)).write_text(" ".join(rng.choice(words, size)))
    return folder


def tiny_topk_sae(folder: Path, *, d_sae: int, k: int, context_size: int,
                  hook: str = "blocks.2.hook_resid_post", spread_bias: bool = False,
                  seed: int = 1) -> Path:
    """A random TopK SAE on tiny-llama (d_in 64) saved at `folder`; `spread_bias` sets b_enc to
    a ramp over [-0.5, 0.5] so latents fire at visibly different rates."""
    import torch

    from app.engine.sae import SAE, SAEConfig

    cfg = SAEConfig(architecture="topk", d_in=64, d_sae=d_sae, k=k, hook_name=hook,
                    model_name="tiny-llama", context_size=context_size)
    sae = SAE.from_config(cfg, seed=seed)
    if spread_bias:
        with torch.no_grad():
            sae.b_enc.copy_(torch.linspace(-0.5, 0.5, d_sae))
    sae.save(folder)
    return folder


def tiny_word_build(root: Path, words: list[str], *, sae_id: str = "tiny",
                    hook: str = "blocks.2.hook_resid_post") -> str:
    """A real precompute on tiny-llama over 8 word documents of 200 words and a random TopK SAE
    (48 latents, k 6, context 32) at `hook`, into `root`/tiny.db; returns its URL."""
    from app.pipeline.precompute import BuildOptions, build

    corpus = word_corpus(root / "docs", words, n_docs=8, lengths=None, name="doc{i}.txt")
    tiny_topk_sae(root / "sae", d_sae=48, k=6, context_size=32, hook=hook)
    url = f"sqlite:///{root / 'tiny.db'}"
    build(BuildOptions(sae_path=root / "sae", corpus=str(corpus), n_tokens=24 * 32,
                       batch_size=8, window_len=10, n_top=4, n_bands=3, per_band=2,
                       eval_tokens=64, progress=False, db_url=url, cache_dir=root / "cache",
                       sae_id=sae_id), log=lambda _m: None)
    return url
