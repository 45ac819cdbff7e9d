"""The precompute run: corpus -> hook activations -> SAE encode -> accumulators -> store.

One pass: each batch of whole sequences is run through the model to the hooked layer once (or
read from a matching activation cache), encoded once, and fed to the accumulators as sparse
records, so the number of forward passes does not depend on d_sae. Accumulator state is
checkpointed atomically under ``{cache_dir}/precompute/{run_key}/`` every few batches and after
the last one; the same command after a ``kill -9`` resumes from the last checkpoint and ends with
exactly the tables of an uninterrupted run (batches are the same, every step is deterministic).
The database write is one transaction (``store.writer.write_run``): readers see the old run or
the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.errors import ConfigError
from app.pipeline.accumulators import FeatureAccumulators, FeatureStatsResult
from app.pipeline.corpus import DEFAULT_CORPUS, TokenizedCorpus, corpus_fingerprint
from app.records import (
    INTERVAL_FINE_BINS,
    FeatureArrays,
    ModelRecord,
    RunRecord,
    SAERecord,
    SequenceArrays,
)

CHECKPOINT_VERSION = 1
Log = Callable[[str], None]


@dataclass
class BuildOptions:
    """Everything a build depends on (the CLI's flags)."""

    sae_path: Path
    model: str | None = None  # preset / folder / .gguf; default: the SAE's model_name
    corpus: str = DEFAULT_CORPUS
    n_tokens: int = 100_000  # token positions processed (BOS and padding included)
    db_url: str | None = None
    sae_id: str | None = None  # default: the SAE folder's name
    hook_name: str | None = None  # default: the SAE's hook
    context_size: int | None = None  # default: the SAE's context_size, else 128
    batch_size: int = 16  # sequences per forward pass
    text_field: str = "text"
    n_top: int = 20
    window_len: int = 32
    n_bands: int = 10
    per_band: int = 3
    n_logits: int = 10
    n_neighbours: int = 10
    eval_tokens: int = 4096  # held-out positions for explained variance / CE loss recovered
    seed: int = 0
    checkpoint_every: int = 20  # batches
    cache_dir: Path | None = None
    use_activation_cache: bool = True
    progress: bool = True


@dataclass
class BuildResult:
    run_id: int | None
    model_id: str
    sae_id: str
    db_url: str
    n_tokens: int
    resumed_at_seq: int  # 0 for a fresh run
    timings: dict[str, float] = field(default_factory=dict)
    checkpoint_dir: Path | None = None
    sae_stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrecomputeRecords:
    """All records of one run, ready for ``write_run``."""

    model: ModelRecord
    sae: SAERecord
    run: RunRecord
    sequences: SequenceArrays
    features: FeatureArrays
    windows: Any

    def as_kwargs(self) -> dict[str, Any]:
        return {"model": self.model, "sae": self.sae, "run": self.run,
                "sequences": self.sequences, "features": self.features,
                "windows": self.windows}


# ---------------------------------------------------------------------------------- checkpoints


class Checkpoint:
    """Accumulator state + position, written atomically (tmp file, then os.replace)."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = folder, key
        self.path = folder / "state.npz"

    def load(self) -> tuple[int, dict[str, np.ndarray]] | None:
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                state = {k: np.array(data[k]) for k in data.files}
        except (OSError, ValueError, EOFError):
            return None  # unreadable (cannot happen with os.replace, but never trust a file)
        meta = json.loads(bytes(state.pop("__meta__")).decode())
        if meta.get("key") != self.key or meta.get("version") != CHECKPOINT_VERSION:
            return None
        return int(meta["next_seq"]), state

    def save(self, *, next_seq: int, state: dict[str, np.ndarray]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"key": self.key, "version": CHECKPOINT_VERSION, "next_seq": int(next_seq)}
        tmp = self.folder / f".state.{os.getpid()}.tmp.npz"
        with tmp.open("wb") as fh:
            np.savez(fh, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                     **state)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ------------------------------------------------------------------------------ activation source


class _Activations:
    """Hook activations per batch, from a matching cache or the model (rounded through float16
    like the cache, so both sources feed the SAE the same numbers)."""

    def __init__(self, *, lm: Any, hook_name: str, cache: Any | None) -> None:
        self.lm, self.hook_name, self.cache = lm, hook_name, cache

    @property
    def source(self) -> str:
        return f"cache:{self.cache.key}" if self.cache is not None else "model"

    def batch(self, tokens: np.ndarray, start: int, stop: int) -> torch.Tensor:
        if self.cache is not None:
            return torch.from_numpy(np.array(self.cache.acts[start:stop], dtype=np.float32))
        ids = torch.from_numpy(np.ascontiguousarray(tokens[start:stop])).long()
        out = self.lm.run_to_hook(ids, self.hook_name)
        return out.to(torch.float16).float()


def _find_cache(*, lm: Any, hook_name: str, opts: BuildOptions, n_tokens: int,
                ctx: int, tokens: np.ndarray, cache_dir: Path) -> Any | None:
    """A complete activation cache for exactly this (model, hook, corpus, budget, ctx)."""
    if not opts.use_activation_cache:
        return None
    from app.pipeline.activations import cache_key, cache_key_parts, open_cache

    # The cache is keyed by the budget as asked (e.g. 200000) and holds budget // ctx sequences.
    for budget in dict.fromkeys((opts.n_tokens, n_tokens)):
        parts = cache_key_parts(lm=lm, hook_name=hook_name, corpus=opts.corpus,
                                text_field=opts.text_field, max_tokens=budget, context_size=ctx)
        folder = cache_dir / "activations" / cache_key(parts)
        if not (folder / "complete.json").exists():
            continue
        cache = open_cache(folder)
        if cache.tokens.shape == tokens.shape and np.array_equal(cache.tokens, tokens):
            return cache
    return None


# --------------------------------------------------------------------------------------- inputs


def _sae_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        digest.update(f"{f.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _tokenize(lm: Any, opts: BuildOptions, ctx: int, n_tokens: int
              ) -> tuple[TokenizedCorpus, np.ndarray, np.ndarray, bool]:
    """The build's sequences, plus held-out sequences after them for the evaluations (or, when
    the corpus has no more text, the build's last sequences: flagged not held out)."""
    from app.pipeline.corpus import load_documents, tokenize_corpus

    n_seq = n_tokens // ctx
    n_eval = max(opts.eval_tokens // ctx, 0)

    def tok(budget: int) -> TokenizedCorpus:
        docs = load_documents(opts.corpus, text_field=opts.text_field)
        return tokenize_corpus(docs, lm=lm, context_size=ctx, max_tokens=budget,
                               source=str(opts.corpus))

    held_out = True
    try:
        full = tok((n_seq + n_eval) * ctx) if n_eval else tok(n_seq * ctx)
    except ConfigError:
        if not n_eval:
            raise
        full = tok(n_seq * ctx)  # raises the corpus-too-small message for the build itself
        held_out = False
    corpus = full.select(slice(0, n_seq))
    if not n_eval:  # no evaluation (not tokens[-0:], which is every sequence)
        eval_tokens, eval_special = full.tokens[:0], full.special_mask[:0]
    elif held_out:
        eval_tokens, eval_special = full.tokens[n_seq:], full.special_mask[n_seq:]
    else:
        eval_tokens, eval_special = full.tokens[-n_eval:], full.special_mask[-n_eval:]
    return corpus, eval_tokens, eval_special, held_out


def _load_inputs(opts: BuildOptions, log: Log, *, cache_dir: Path
                 ) -> tuple[Any, Any, str, str, int]:
    from app.engine.loading import load_model
    from app.engine.sae import SAE

    sae_path = Path(opts.sae_path).expanduser()
    if not sae_path.exists():
        raise ConfigError(f"SAE folder {sae_path} does not exist; train one with "
                          "`saescope train-sae` or pass --sae PATH to an SAE folder")
    log(f"loading SAE from {sae_path}")
    sae = SAE.load(sae_path).eval()
    model_spec = opts.model or sae.cfg.model_name
    if not model_spec:
        raise ConfigError(f"SAE {sae_path} does not name its model; pass --model")
    log(f"loading model {model_spec}")
    lm = load_model(model_spec, cache_dir=cache_dir)
    hook = opts.hook_name or sae.cfg.hook_name
    if not hook:
        raise ConfigError(f"SAE {sae_path} does not name its hook; pass --hook "
                          f"(one of e.g. {', '.join(lm.hook_names()[:3])}, ...)")
    hook = lm.hook_point(hook).name
    sae.check_compatible(d_model=lm.d_model)
    sae_id = opts.sae_id or sae_path.resolve().name
    ctx = int(opts.context_size or sae.cfg.context_size or 128)
    return lm, sae, hook, sae_id, ctx


def _check_options(opts: BuildOptions) -> None:
    for name in ("n_tokens", "batch_size", "n_top", "window_len", "n_bands", "per_band",
                 "checkpoint_every"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"{name.replace('_', ' ')} must be at least 1 "
                              f"(got {getattr(opts, name)})")
    if opts.context_size is not None and opts.context_size < 2:
        raise ConfigError(f"context size must be at least 2 (got {opts.context_size})")
    if opts.eval_tokens < 0:
        raise ConfigError(f"eval tokens must be >= 0 (got {opts.eval_tokens})")


# ------------------------------------------------------------------------------------ the run


@dataclass
class _Prepared:
    lm: Any
    sae: Any
    hook: str
    sae_id: str
    corpus: TokenizedCorpus
    eval_tokens: np.ndarray
    eval_special: np.ndarray
    held_out: bool
    source: _Activations
    config: dict[str, Any]
    ckpt: Checkpoint
    static: Any  # static_features.StaticFeatures, already running in the background


def build(opts: BuildOptions, *, log: Log = print, lm: Any = None, sae: Any = None,
          stop_after_batches: int | None = None) -> BuildResult:
    """Run the precompute for one SAE and write it to the database; resumes a killed run.

    ``lm`` / ``sae`` may be passed already loaded (tests, benchmarks); the SAE folder still
    names the SAE. ``stop_after_batches`` (tests) returns after that many batches of this
    invocation, leaving the checkpoint as a kill would (``run_id`` None).
    """
    from app.settings import get_settings
    from app.store.db import make_engine
    from app.store.writer import write_run

    db_url = opts.db_url or get_settings().db_url
    _open_database(db_url, create=False)  # a bad URL fails now, not after the whole pass
    records, result = compute_records(opts, log=log, lm=lm, sae=sae,
                                      stop_after_batches=stop_after_batches)
    if records is None:
        return result
    t = time.perf_counter()
    log(f"writing run to {result.db_url}")
    _open_database(result.db_url, create=True)
    engine = make_engine(result.db_url)
    try:
        result.run_id = write_run(engine_or_session=engine, **records.as_kwargs())
    finally:
        engine.dispose()
    result.timings["write"] = time.perf_counter() - t
    Checkpoint(result.checkpoint_dir, "").remove()
    log(f"done: run {result.run_id} for SAE {result.sae_id} ({result.n_tokens} tokens)")
    return result


def _open_database(db_url: str, *, create: bool) -> None:
    """Check the URL (and reach a server) early, or create / upgrade the schema before the write;
    connection failures become one clear error."""
    from sqlalchemy.exc import SQLAlchemyError

    from app.store.db import is_sqlite, make_engine, upgrade

    try:
        if create:
            upgrade(db_url)
            return
        engine = make_engine(db_url)
        try:
            if not is_sqlite(engine):
                with engine.connect():
                    pass
        finally:
            engine.dispose()
    except SQLAlchemyError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot open database {db_url}: {first}; check --db") from None


def compute_records(opts: BuildOptions, *, log: Log = print, lm: Any = None, sae: Any = None,
                    stop_after_batches: int | None = None
                    ) -> tuple[PrecomputeRecords | None, BuildResult]:
    """Everything ``build`` does except the database write (resumes from a checkpoint too)."""
    from app.settings import get_settings

    _check_options(opts)
    settings = get_settings()
    db_url = opts.db_url or settings.db_url
    timings: dict[str, float] = {}
    t = time.perf_counter()
    p = _prepare(opts, log=log, lm=lm, sae=sae,
                 cache_dir=Path(opts.cache_dir or settings.cache_dir))
    timings["prepare"] = time.perf_counter() - t
    try:  # from here on every exit stops the static-features worker (finally below)
        n_tokens = p.corpus.n_seq * p.corpus.context_size
        acc = FeatureAccumulators(int(p.sae.cfg.d_sae), ctx=p.corpus.context_size, n_top=opts.n_top,
                                  window_len=opts.window_len, n_bands=opts.n_bands,
                                  per_band=opts.per_band, seed=opts.seed)
        start_seq = 0
        loaded = p.ckpt.load()
        if loaded is not None:
            start_seq, state = loaded
            acc.load_state_dict(state)
            log(f"resuming from checkpoint at sequence {start_seq} of {p.corpus.n_seq}")
        result = BuildResult(run_id=None, model_id=p.lm.model_id, sae_id=p.sae_id, db_url=db_url,
                             n_tokens=n_tokens, resumed_at_seq=start_seq, timings=timings,
                             checkpoint_dir=p.ckpt.folder)

        t = time.perf_counter()
        stopped = _stream(acc=acc, sae=p.sae, source=p.source, corpus=p.corpus,
                          start_seq=start_seq, opts=opts, ckpt=p.ckpt,
                          stop_after_batches=stop_after_batches)
        timings["stream"] = time.perf_counter() - t
        if stopped:
            return None, result

        t = time.perf_counter()
        log("finalizing feature statistics")
        stats = acc.finalize()
        timings["finalize_stats"] = time.perf_counter() - t

        t = time.perf_counter()
        ev = None
        train_metrics = _train_metrics(opts.sae_path)
        if p.eval_tokens.size:
            ev = _evaluate(p, opts, train_evals=train_metrics, log=log)
        timings["evaluate"] = time.perf_counter() - t

        t = time.perf_counter()
        job = p.static
        done = job.background_progress()
        log(f"logit effects and decoder neighbours: {done} of {job.units_total} units done "
            f"in the background; finishing the rest")
        static = job.finish()
        timings["static_wait"] = time.perf_counter() - t
        timings["static_units_background"] = float(static.units_in_background)
        timings["static_units_total"] = float(static.units_total)
    finally:
        p.static.stop()  # no-op once finished; an abandoned build leaves no worker behind

    t = time.perf_counter()
    records = make_records(lm=p.lm, sae=p.sae, hook=p.hook, sae_id=p.sae_id,
                           sae_path=opts.sae_path, corpus=p.corpus, stats=stats,
                           static=static, train_metrics=train_metrics, config=p.config,
                           opts=opts)
    if ev is not None:
        records.run.sae_stats.update({
            k: ev[k] for k in ("explained_variance", "ce_loss_clean", "ce_loss_sae",
                               "ce_loss_ablated", "ce_loss_recovered") if k in ev})
        records.run.sae_stats["eval"] = {**ev, "held_out": p.held_out}
    timings["records"] = time.perf_counter() - t
    # Everything after the stream but the evaluation (the build's fixed cost).
    timings["finalize"] = (timings["finalize_stats"] + timings["static_wait"]
                           + timings["records"])
    result.sae_stats = records.run.sae_stats
    return records, result


def _train_metrics(sae_path: Path | str) -> dict[str, Any] | None:
    """The SAE folder's evals.json (train-sae's held-out evaluation), if readable."""
    evals_file = Path(sae_path) / "evals.json"
    if not evals_file.exists():
        return None
    try:
        return json.loads(evals_file.read_text())
    except ValueError:
        return None


def _evaluate(p: _Prepared, opts: BuildOptions, *, train_evals: dict[str, Any] | None,
              log: Log) -> dict[str, Any]:
    """Held-out evaluation: the figures train-sae wrote to the SAE folder's evals.json when they
    measured exactly this evaluation (same model, hook, held-out token ids, SAE files, evaluation
    version; see ``evals.reusable_evals``), else a fresh ``evaluate_sae``. The result says which
    (``reused_from`` with what was matched, or ``computed`` with the reason)."""
    from app.engine.evals import (
        REUSED_KEYS,
        evaluate_sae,
        held_out_fingerprint,
        reusable_evals,
        sae_files_fingerprint,
    )

    tokens_sha = held_out_fingerprint(p.eval_tokens)
    if p.held_out:
        sae_sha = sae_files_fingerprint(opts.sae_path)
        ok, why = reusable_evals(train_evals, model_id=p.lm.model_id, hook_name=p.hook,
                                 held_out_sha256=tokens_sha, sae_sha256=sae_sha)
    else:
        ok, why = False, "no held-out text after the build's tokens"
    evals_file = Path(opts.sae_path) / "evals.json"
    if ok and train_evals is not None:
        log(f"held-out evals: reusing {evals_file} (matched {why})")
        kept = (*REUSED_KEYS, "hook_name", "exclude_special_tokens", "dense_threshold",
                "eval_version")
        return {**{k: train_evals[k] for k in kept if k in train_evals},
                "held_out_sha256": tokens_sha,
                "reused_from": {"file": str(evals_file.resolve()), "matched": why.split(", "),
                                "sae_sha256": sae_sha}}
    kind = "held-out" if p.held_out else "corpus"
    log(f"evaluating the SAE on {p.eval_tokens.size} {kind} tokens (not reusing evals.json: "
        f"{why})")
    with torch.inference_mode():
        ev = evaluate_sae(p.sae, p.lm, p.eval_tokens, p.eval_special, hook_name=p.hook,
                          batch_size=max(1, min(opts.batch_size, 8)), progress=opts.progress)
    return {**ev, "held_out_sha256": tokens_sha, "computed": why}


def _prepare(opts: BuildOptions, *, log: Log, lm: Any, sae: Any, cache_dir: Path) -> _Prepared:
    if lm is None or sae is None:
        lm, sae, hook, sae_id, ctx = _load_inputs(opts, log, cache_dir=cache_dir)
    else:
        hook = lm.hook_point(opts.hook_name or sae.cfg.hook_name).name
        sae_id = opts.sae_id or Path(opts.sae_path).resolve().name
        ctx = int(opts.context_size or sae.cfg.context_size or 128)
    n_seq = opts.n_tokens // ctx
    if n_seq < 1:
        raise ConfigError(f"--tokens {opts.n_tokens} is less than one sequence of {ctx} tokens")
    n_tokens = n_seq * ctx
    static = start_static_features(lm=lm, sae=sae, opts=opts)
    try:
        return _prepare_run(opts, log=log, lm=lm, sae=sae, hook=hook, sae_id=sae_id, ctx=ctx,
                            n_tokens=n_tokens, cache_dir=cache_dir, static=static)
    except BaseException:
        static.stop()
        raise


def _prepare_run(opts: BuildOptions, *, log: Log, lm: Any, sae: Any, hook: str, sae_id: str,
                 ctx: int, n_tokens: int, cache_dir: Path, static: Any) -> _Prepared:
    log(f"tokenizing corpus {opts.corpus} ({n_tokens} tokens, context {ctx})")
    corpus, eval_tokens, eval_special, held_out = _tokenize(lm, opts, ctx, n_tokens)
    cache = _find_cache(lm=lm, hook_name=hook, opts=opts, n_tokens=n_tokens, ctx=ctx,
                        tokens=corpus.tokens, cache_dir=cache_dir)
    source = _Activations(lm=lm, hook_name=hook, cache=cache)
    log("activations: " + (f"reusing cache {cache.path}" if cache is not None
                           else f"running {lm.model_id} to {hook}"))
    config = {
        "model": lm.model_id, "model_source": str(lm.source), "hook_name": hook,
        "sae_path": str(Path(opts.sae_path).resolve()), "sae_id": sae_id,
        "corpus": str(opts.corpus), "text_field": opts.text_field, "n_tokens": n_tokens,
        "context_size": ctx, "batch_size": opts.batch_size, "n_top": opts.n_top,
        "window_len": opts.window_len, "n_bands": opts.n_bands, "per_band": opts.per_band,
        "interval_fine_bins": INTERVAL_FINE_BINS,
        "n_logits": opts.n_logits, "n_neighbours": opts.n_neighbours,
        "eval_tokens": int(eval_tokens.size), "seed": opts.seed,
        "activations": source.source.split(":")[0],
    }
    key_parts = {**config, "sae_fingerprint": _sae_fingerprint(Path(opts.sae_path)),
                 "corpus_fingerprint": corpus_fingerprint(opts.corpus,
                                                          text_field=opts.text_field),
                 "activation_source": source.source, "version": CHECKPOINT_VERSION}
    run_key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    ckpt = Checkpoint(cache_dir / "precompute" / run_key, run_key)
    return _Prepared(lm=lm, sae=sae, hook=hook, sae_id=sae_id, corpus=corpus,
                     eval_tokens=eval_tokens, eval_special=eval_special, held_out=held_out,
                     source=source, config=config, ckpt=ckpt, static=static)


def start_static_features(*, lm: Any, sae: Any, opts: BuildOptions) -> Any:
    """Logit effects and decoder neighbours need only the weights, so they start now, in a
    lowest-priority worker process that uses the CPU the tokenizer and the stream leave idle
    (see ``StaticFeatures.start_background``); ``compute_records`` finishes what is left."""
    from app.pipeline.static_features import StaticFeatures

    w_u, scale = lm.unembedding()
    job = StaticFeatures(w_dec=sae.W_dec.detach().float(), norm_scale=scale, w_u=w_u,
                         n_logits=opts.n_logits, n_neighbours=opts.n_neighbours)
    job.start_background()
    return job


def _stream(*, acc: FeatureAccumulators, sae: Any, source: _Activations,
            corpus: TokenizedCorpus, start_seq: int, opts: BuildOptions, ckpt: Checkpoint,
            stop_after_batches: int | None) -> bool:
    """Feed batches [start_seq, n_seq) to the accumulators; True if stopped early (tests)."""
    n_seq, ctx, bs = corpus.n_seq, corpus.context_size, opts.batch_size
    sparse_code = sae.cfg.architecture == "topk"
    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=n_seq * ctx, initial=start_seq * ctx, unit="tok", unit_scale=True,
                   desc="precompute", dynamic_ncols=True, mininterval=0.5)
    done = 0
    try:
        for s in range(start_seq, n_seq, bs):
            e = min(s + bs, n_seq)
            with torch.inference_mode():
                acts = source.batch(corpus.tokens, s, e)
                if sparse_code:  # no [tokens, d_sae] code at all (see SAE.encode_sparse)
                    values, indices = sae.encode_sparse(acts)
                    acc.update_sparse(values, indices, special_mask=corpus.special_mask[s:e],
                                      seq_index=np.arange(s, e))
                    del values, indices
                else:
                    acc.update(sae.encode(acts), special_mask=corpus.special_mask[s:e],
                               seq_index=np.arange(s, e))
            del acts
            done += 1
            if done % opts.checkpoint_every == 0 or e == n_seq:
                ckpt.save(next_seq=e, state=acc.state_dict())
            if bar is not None:
                bar.update((e - s) * ctx)
            if stop_after_batches is not None and done >= stop_after_batches and e < n_seq:
                return True
    finally:
        if bar is not None:
            bar.close()
    return False


def make_records(*, lm: Any, sae: Any, hook: str, sae_id: str, sae_path: Path | str,
                 corpus: TokenizedCorpus, stats: FeatureStatsResult, static: Any,
                 train_metrics: dict[str, Any] | None, config: dict[str, Any],
                 opts: BuildOptions) -> PrecomputeRecords:
    """Turn finalized statistics and the static features (``StaticResult``) into store
    records."""
    effects = static.logits
    features = FeatureArrays(
        count=stats.count, act_sum=stats.act_sum, max_act=stats.max_act,
        frac_nonzero=stats.frac_nonzero, hist_edges=stats.hist_edges,
        hist_counts=stats.hist_counts, band_share=stats.band_share, band_count=stats.band_count,
        logit_pos_ids=effects.pos_ids, logit_pos_values=effects.pos_values,
        logit_neg_ids=effects.neg_ids, logit_neg_values=effects.neg_values,
        neighbour_idx=static.neighbour_idx, neighbour_cos=static.neighbour_cos)
    used = np.unique(stats.windows.seq_index)
    sequences = SequenceArrays(seq_index=used.astype(np.int64),
                               doc_index=corpus.doc_index[used].astype(np.int64),
                               tokens=corpus.tokens[used].astype(np.int32),
                               doc_names=list(corpus.doc_names))
    model = ModelRecord(model_id=lm.model_id, source=str(lm.source),
                        architecture=lm.architecture, d_model=int(lm.d_model),
                        n_layers=int(lm.n_layers), vocab_size=int(lm.vocab_size),
                        token_strings=list(lm.token_strings()),
                        bos_token_id=lm.bos_token_id, has_chat_template=bool(lm.has_chat_template))
    cfg = _sae_cfg_dict(sae)
    sae_rec = SAERecord(model_id=lm.model_id, sae_id=sae_id, hook_name=hook,
                        architecture=str(sae.cfg.architecture), d_in=int(sae.cfg.d_in),
                        d_sae=int(sae.cfg.d_sae), path=str(Path(sae_path).resolve()), cfg=cfg,
                        train_metrics=train_metrics)
    run = RunRecord(corpus=str(opts.corpus), n_tokens=stats.n_tokens,
                    n_tokens_counted=stats.n_tokens_counted, context_size=corpus.context_size,
                    window_len=opts.window_len, n_top=opts.n_top, n_bands=opts.n_bands,
                    config=config, sae_stats=dict(stats.sae_stats))
    return PrecomputeRecords(model=model, sae=sae_rec, run=run, sequences=sequences,
                             features=features, windows=stats.windows)


def _sae_cfg_dict(sae: Any) -> dict[str, Any]:
    try:
        cfg = asdict(sae.cfg)
    except TypeError:
        cfg = dict(vars(sae.cfg))
    return json.loads(json.dumps(cfg, default=str))
