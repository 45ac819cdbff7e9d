"""The precompute run: corpus -> hook activations -> SAE encode -> accumulators -> store.

One pass: each batch of whole sequences is run through the model to the hooked layer once (or
read from a matching activation cache), encoded once, and fed to the accumulators as sparse
records, so the number of forward passes does not depend on d_sae. Accumulator state is
checkpointed atomically (``checkpoint.py``) every few batches and after the last one; the same
command after a ``kill -9`` resumes from the last checkpoint and ends with exactly the tables of
an uninterrupted run (batches are the same, every step is deterministic). The database write is
one transaction (``store.writer.write_run``): readers see the old run or the new one.

This module wires the build; what it reads is in ``build_inputs.py``, the held-out evaluation
in ``build_evals.py``, the store records in ``build_records.py``, the weights-only features in
``static_features.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from app.errors import ConfigError, Interrupted
from app.pipeline.accumulators import FeatureAccumulators
from app.pipeline.batches import feed_batch, new_accumulators
from app.pipeline.build_evals import evaluate, train_metrics
from app.pipeline.build_inputs import (
    ActivationSource,
    find_cache,
    load_inputs,
    tokenize,
    trained_on,
)
from app.pipeline.build_options import BuildOptions, Log, check_options
from app.pipeline.build_records import PrecomputeRecords, make_records
from app.pipeline.checkpoint import Checkpoint, open_checkpoint, run_key
from app.pipeline.corpus import PACKING, TokenizedCorpus
from app.pipeline.interrupts import DeferredInterrupt
from app.records import INTERVAL_FINE_BINS

if TYPE_CHECKING:
    from app.engine.lm import LanguageModel
    from app.engine.sae import SAE
    from app.pipeline.static_features import StaticFeatures

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
    shards_total: int = 0  # a sharded build: its shards, and those this invocation ran
    shards_run: list[int] = field(default_factory=list)


@dataclass
class _Prepared:
    lm: LanguageModel
    sae: SAE
    hook: str
    sae_id: str
    corpus: TokenizedCorpus
    eval_tokens: np.ndarray
    eval_special: np.ndarray
    held_out: bool
    source: ActivationSource
    config: dict[str, Any]
    ckpt: Checkpoint
    static: StaticFeatures  # already running in the background


def build(opts: BuildOptions, *, log: Log = print, lm: LanguageModel | None = None,
          sae: SAE | None = None, stop_after_batches: int | None = None,
          stop_after_shards: int | None = None) -> BuildResult:
    """Run the precompute for one SAE and write it to the database; resumes a killed run.

    ``lm`` / ``sae`` may be passed already loaded (tests, benchmarks); the SAE folder still
    names the SAE. ``stop_after_batches`` (tests) returns after that many batches of this
    invocation, leaving the checkpoint as a kill would (``run_id`` None); in a sharded build
    (``opts.shards``) ``stop_after_shards`` does the same after that many finished shards.
    """
    from app.pipeline.outputs import check_database

    check_database(opts.db_url)  # before any model runs: a bad --db fails in a second
    records, result = compute_records(opts, log=log, lm=lm, sae=sae,
                                      stop_after_batches=stop_after_batches,
                                      stop_after_shards=stop_after_shards)
    if records is None:
        return result
    t = time.perf_counter()
    log(f"writing run to {_shown(result.db_url)}")
    try:
        result.run_id = _write(result.db_url, records, log=log)
    except ConfigError as exc:
        # The pass is done and its state is checkpointed: say how to use it, keep it.
        raise ConfigError(
            f"{exc}. The finished pass is kept in {result.checkpoint_dir}: the same command "
            "with a working --db resumes from it and only writes the run") from None
    result.timings["write"] = time.perf_counter() - t
    Checkpoint(result.checkpoint_dir, "").remove()
    log(f"done: run {result.run_id} for SAE {result.sae_id} ({result.n_tokens:,} tokens)")
    return result


def _shown(db_url: str) -> str:
    from app.store.db import display_url

    return display_url(db_url)


def _write(db_url: str, records: PrecomputeRecords, *, log: Log) -> int:
    """Create or upgrade the schema, say which run the new one replaces, then write it in one
    transaction; a failure is one ConfigError naming the database."""
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from app.store.db import make_engine, upgrade
    from app.store.writer import write_run

    try:
        upgrade(db_url)
        engine = make_engine(db_url)
        try:
            _say_replaced(engine, sae_id=records.sae.sae_id, log=log)
            return write_run(engine_or_session=engine, **records.as_kwargs())
        finally:
            engine.dispose()
    except (SQLAlchemyError, CommandError, OSError) as exc:
        text = str(getattr(exc, "orig", None) or exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise ConfigError(f"cannot write the run to {_shown(db_url)}: {reason}") from None


def _say_replaced(engine: Any, *, sae_id: str, log: Log) -> None:
    """A rebuild replaces the SAE's active run (labels stay): say which one."""
    from app.errors import NotFoundError
    from app.store.db import make_sessionmaker
    from app.store.queries import get_sae

    try:
        with make_sessionmaker(engine)() as session:
            old = get_sae(session=session, sae_id=sae_id).run
    except NotFoundError:
        return
    if old is not None:
        log(f"replacing run {old.id} of SAE {sae_id} ({old.n_tokens_counted:,} tokens over "
            f"{old.corpus}, written {old.created_at:%Y-%m-%d %H:%M}); its labels are kept")


def compute_records(opts: BuildOptions, *, log: Log = print, lm: LanguageModel | None = None,
                    sae: SAE | None = None, stop_after_batches: int | None = None,
                    stop_after_shards: int | None = None
                    ) -> tuple[PrecomputeRecords | None, BuildResult]:
    """Everything ``build`` does except the database write (resumes from a checkpoint too)."""
    from app.pipeline.outputs import check_corpus, check_writable_dir

    check_options(opts)
    if opts.shards:
        from app.pipeline.sharded import require_ray

        require_ray()  # before anything loads: without Ray, one line saying what to install
    check_writable_dir(Path(opts.cache_dir), what=f"the data folder's cache {opts.cache_dir}",
                       hint="set SAESCOPE_HOME to a writable folder")
    check_corpus(str(opts.corpus), text_field=opts.text_field)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    p = _prepare(opts, log=log, lm=lm, sae=sae)
    timings["prepare"] = time.perf_counter() - t
    try:  # from here on every exit stops the static-features worker (finally below)
        result = BuildResult(run_id=None, model_id=p.lm.model_id, sae_id=p.sae_id,
                             db_url=opts.db_url, n_tokens=p.corpus.real_tokens(),
                             resumed_at_seq=0, timings=timings, checkpoint_dir=p.ckpt.folder)
        t = time.perf_counter()
        static = None
        if opts.shards:
            from app.pipeline.sharded import accumulate_sharded

            cache = p.source.cache
            run = accumulate_sharded(corpus=p.corpus, sae=p.sae, static=p.static, ckpt=p.ckpt,
                                     cache_folder=cache.path if cache is not None else None,
                                     opts=opts, log=log, timings=timings,
                                     stop_after_shards=stop_after_shards)
            acc, static = run.acc, run.static
            result.shards_total, result.shards_run = run.shards_total, run.shards_run
        else:
            acc = _accumulate_here(p, opts=opts, log=log, result=result,
                                   stop_after_batches=stop_after_batches)
        timings["stream"] = time.perf_counter() - t
        if acc is None:
            return None, result

        t = time.perf_counter()
        log("finalizing feature statistics")
        stats = acc.finalize()
        timings["finalize_stats"] = time.perf_counter() - t

        t = time.perf_counter()
        ev = None
        train_evals = train_metrics(opts.sae_path)
        if p.eval_tokens.size:
            ev = evaluate(lm=p.lm, sae=p.sae, hook=p.hook, eval_tokens=p.eval_tokens,
                          eval_special=p.eval_special, held_out=p.held_out, opts=opts,
                          train_evals=train_evals, log=log)
        timings["evaluate"] = time.perf_counter() - t

        t = time.perf_counter()
        if static is None:
            job = p.static
            done_units = job.background_progress()
            log(f"logit effects and decoder neighbours: {done_units} of {job.units_total} units "
                "done in the background; finishing the rest")
            static = job.finish()
        timings["static_wait"] = time.perf_counter() - t
        timings["static_units_background"] = float(static.units_in_background)
        timings["static_units_total"] = float(static.units_total)
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted):
            raise
        raise Interrupted(_saved_message(p)) from None
    finally:
        p.static.stop()  # no-op once finished; an abandoned build leaves no worker behind

    t = time.perf_counter()
    records = make_records(lm=p.lm, sae=p.sae, hook=p.hook, sae_id=p.sae_id,
                           sae_path=opts.sae_path, corpus=p.corpus, stats=stats,
                           static=static, train_metrics=train_evals, config=p.config,
                           opts=opts)
    if ev is not None:
        records.run.sae_stats.update({
            k: ev[k] for k in ("explained_variance", "ce_loss_clean", "ce_loss_sae",
                               "ce_loss_ablated", "ce_loss_recovered") if k in ev})
        records.run.sae_stats["eval"] = {**ev, "held_out": p.held_out,
                                         "held_out_after_tokens": p.config["eval_after_tokens"]}
    timings["records"] = time.perf_counter() - t
    # Everything after the stream but the evaluation (the build's fixed cost).
    timings["finalize"] = (timings["finalize_stats"] + timings["static_wait"]
                           + timings["records"])
    result.sae_stats = records.run.sae_stats
    return records, result


def _accumulate_here(p: _Prepared, *, opts: BuildOptions, log: Log, result: BuildResult,
                     stop_after_batches: int | None) -> FeatureAccumulators | None:
    """The stream in this process, from the checkpoint if there is one; None if stopped."""
    acc = new_accumulators(int(p.sae.cfg.d_sae), ctx=p.corpus.context_size, opts=opts)
    start_seq = 0
    loaded = p.ckpt.load()
    if loaded is not None:
        start_seq, state = loaded
        acc.load_state_dict(state)
        log(f"resuming at {p.corpus.real_tokens(start_seq):,} of "
            f"{p.corpus.real_tokens():,} tokens (sequence {start_seq} of {p.corpus.n_seq}, "
            f"checkpoint in {p.ckpt.folder})")
    result.resumed_at_seq = start_seq
    stopped = _stream(acc=acc, sae=p.sae, source=p.source, corpus=p.corpus,
                      start_seq=start_seq, opts=opts, ckpt=p.ckpt,
                      stop_after_batches=stop_after_batches)
    return None if stopped else acc


def _saved_message(p: _Prepared) -> str:
    """What a Ctrl-C outside the stream leaves: the last checkpoint, if any."""
    kept = sorted((p.ckpt.folder / "shards").glob("*.npz"))
    if kept:  # a sharded build
        return (f"interrupted; {len(kept)} finished shards are kept in {kept[0].parent}: the "
                "same command runs only the others")
    saved = p.ckpt.saved_seq()
    if saved is None:
        return "interrupted before the first checkpoint; a later run starts over"
    return (f"interrupted; the checkpoint at {p.corpus.real_tokens(saved):,} of "
            f"{p.corpus.real_tokens():,} tokens is kept: the same command resumes there")


def _prepare(opts: BuildOptions, *, log: Log, lm: LanguageModel | None,
             sae: SAE | None) -> _Prepared:
    if lm is None or sae is None:
        lm, sae, hook, sae_id, ctx = load_inputs(opts, log)
    else:
        hook = lm.hook_point(opts.hook_name or sae.cfg.hook_name).name
        sae_id = opts.sae_id or Path(opts.sae_path).resolve().name
        ctx = int(opts.context_size or sae.cfg.context_size or 128)
    static = start_static_features(lm=lm, sae=sae, opts=opts, background=not opts.shards)
    try:
        return _prepare_run(opts, log=log, lm=lm, sae=sae, hook=hook, sae_id=sae_id, ctx=ctx,
                            static=static)
    except BaseException:
        static.stop()
        raise


def _prepare_run(opts: BuildOptions, *, log: Log, lm: LanguageModel, sae: SAE, hook: str,
                 sae_id: str, ctx: int, static: StaticFeatures) -> _Prepared:
    log(f"tokenizing corpus {opts.corpus} ({opts.n_tokens:,} text tokens packed in sequences "
        f"of {ctx})")
    tok = tokenize(lm, opts, ctx, trained_tokens=trained_on(sae, opts), log=log)
    corpus, eval_tokens, eval_special = tok.corpus, tok.eval_tokens, tok.eval_special
    held_out = eval_tokens.size > 0
    n_tokens = corpus.real_tokens()
    if n_tokens != opts.n_tokens:
        log(f"--tokens {opts.n_tokens:,} rounded down to {n_tokens:,}: the text of "
            f"{corpus.n_seq} whole sequences of {ctx}")
    if tok.no_eval_reason and opts.eval_tokens:
        log(f"no evaluation: {tok.no_eval_reason}, and the SAE is never scored on text it was "
            "built or trained over")
    cache = find_cache(lm=lm, hook_name=hook, opts=opts, n_tokens=n_tokens, ctx=ctx,
                       tokens=corpus.tokens)
    source = ActivationSource(lm=lm, hook_name=hook, cache=cache, device=sae.device)
    log("activations: " + (f"reusing cache {cache.path}" if cache is not None
                           else f"running {lm.model_id} to {hook}"))
    config = {
        "model": lm.model_id, "model_source": str(lm.source), "hook_name": hook,
        "sae_path": str(Path(opts.sae_path).resolve()), "sae_id": sae_id,
        "corpus": str(opts.corpus), "text_field": opts.text_field, "n_tokens": n_tokens,
        "token_budget": opts.n_tokens, "packing": PACKING, "context_size": ctx,
        "batch_size": opts.batch_size, "n_top": opts.n_top,
        "window_len": opts.window_len, "n_bands": opts.n_bands, "per_band": opts.per_band,
        "interval_fine_bins": INTERVAL_FINE_BINS,
        "n_logits": opts.n_logits, "n_neighbours": opts.n_neighbours,
        "eval_tokens": int((~eval_special).sum()), "eval_after_tokens": tok.eval_after,
        "seed": opts.seed,
        "activations": source.source.split(":")[0],
    }
    if lm.dtype != torch.float32:  # float32 builds keep today's config (and checkpoint key)
        config["model_dtype"] = str(lm.dtype).removeprefix("torch.")
    key = run_key(config, sae_path=Path(opts.sae_path), corpus=opts.corpus,
                  text_field=opts.text_field, activation_source=source.source)
    ckpt = open_checkpoint(Path(opts.cache_dir), key)
    return _Prepared(lm=lm, sae=sae, hook=hook, sae_id=sae_id, corpus=corpus,
                     eval_tokens=eval_tokens, eval_special=eval_special, held_out=held_out,
                     source=source, config=config, ckpt=ckpt, static=static)


def start_static_features(*, lm: LanguageModel, sae: SAE, opts: BuildOptions,
                          background: bool = True) -> StaticFeatures:
    """Logit effects and decoder neighbours need only the weights, so they start now, in a
    lowest-priority worker process that uses the CPU the tokenizer and the stream leave idle
    (see ``StaticFeatures.start_background``); ``compute_records`` finishes what is left. A
    sharded build (no ``background``) sends their units to its workers instead."""
    from app.pipeline.static_features import StaticFeatures

    w_u, scale = lm.unembedding()
    # numpy does this work, on the CPU, in float32 whatever the model's device and dtype
    job = StaticFeatures(w_dec=sae.W_dec.detach().float().cpu(), norm_scale=scale.float().cpu(),
                         w_u=w_u.float().cpu(),
                         n_logits=opts.n_logits, n_neighbours=opts.n_neighbours)
    if background:
        job.start_background()
    return job


def _stream(*, acc: FeatureAccumulators, sae: SAE, source: ActivationSource,
            corpus: TokenizedCorpus, start_seq: int, opts: BuildOptions, ckpt: Checkpoint,
            stop_after_batches: int | None) -> bool:
    """Feed batches [start_seq, n_seq) to the accumulators; True if stopped early (tests)."""
    n_seq, ctx, bs = corpus.n_seq, corpus.context_size, opts.batch_size
    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=n_seq * ctx, initial=start_seq * ctx, unit="tok", unit_scale=True,
                   desc="precompute", dynamic_ncols=True, mininterval=0.5)
    done = 0
    last_save = time.monotonic()
    try:
        with DeferredInterrupt() as interrupt:
            for s in range(start_seq, n_seq, bs):
                e = min(s + bs, n_seq)
                feed_batch(acc=acc, sae=sae, source=source, tokens=corpus.tokens,
                           special_mask=corpus.special_mask, start=s, stop=e)
                done += 1
                # A checkpoint every few batches, every checkpoint_seconds, at the end, and on
                # Ctrl-C (which waits for the batch, so the state saved is whole).
                if (done % opts.checkpoint_every == 0 or e == n_seq or interrupt.requested
                        or time.monotonic() - last_save >= opts.checkpoint_seconds):
                    ckpt.save(next_seq=e, state=acc.state_dict())
                    last_save = time.monotonic()
                if bar is not None:
                    bar.update((e - s) * ctx)
                if interrupt.requested:
                    raise Interrupted(
                        f"interrupted; saved a checkpoint at {corpus.real_tokens(e):,} of "
                        f"{corpus.real_tokens():,} tokens: the same command resumes there")
                if stop_after_batches is not None and done >= stop_after_batches and e < n_seq:
                    return True
    finally:
        if bar is not None:
            bar.close()
    return False

