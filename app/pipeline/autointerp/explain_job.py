"""The `saescope explain` job: explain features one by one, score each explanation, and store it
as a draft label with its scores, resumably.

Each feature's draft and scores are written in one transaction, so a killed job leaves every
feature either finished or untouched; a rerun asks the store which features this explainer has
finished with this seed (and scorer and methods) and skips them, saying how many. With
``concurrency`` above one, that many features are explained and scored at once on worker
threads (for remote endpoints, whose requests wait on the network); the main thread stores each
as it finishes. A backend's token budget used up (TokenBudgetExceeded) ends the job cleanly: the
finished features stay stored, and the summary says why it stopped.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.errors import ConfigError, Interrupted
from app.pipeline.autointerp.backends import ChatBackend, ChatOptions
from app.pipeline.autointerp.negatives import SequencePool
from app.pipeline.autointerp.pattern import explain_pattern
from app.pipeline.autointerp.scoring import DETECTION, ScoringOptions, score_explanation
from app.pipeline.autointerp.usage import TokenBudgetExceeded
from app.store import queries
from app.store.db import read_session
from app.store.labels.edits import MAX_DESCRIPTION
from app.store.labels.scores import (
    ScoreRecord,
    automatic_author,
    explained_features,
    save_explanation,
)
from app.store.read_models import FeatureDetail
from app.store.tables import SCORE_METHODS

EXPLAINERS = ("pattern", "local", "openai")
MAX_SELECTED = 1 << 22  # a --features range this wide is a typo, not a request
_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


@dataclass(frozen=True)
class FeatureSelection:
    indices: list[int] | None  # None: every feature
    unlabeled: bool = False


def parse_features(spec: str) -> FeatureSelection:
    """'all', 'unlabeled', or comma-separated indices and inclusive ranges ('0-499,1000')."""
    text = spec.strip().lower()
    if text in ("all", "unlabeled"):
        return FeatureSelection(None, unlabeled=text == "unlabeled")
    indices: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if part.isdigit():
            indices.add(int(part))
        elif (match := _RANGE.match(part)) and int(match[1]) <= int(match[2]):
            lo, hi = int(match[1]), int(match[2])
            if hi - lo + len(indices) >= MAX_SELECTED:
                raise ConfigError(f"--features {spec!r} selects more than {MAX_SELECTED} "
                                  "features")
            indices.update(range(lo, hi + 1))
        else:
            raise ConfigError(f"--features {spec!r}: use all, unlabeled, or indices and ranges "
                              "such as 0-499 or 1,5,9")
    return FeatureSelection(sorted(indices))


def parse_methods(spec: str) -> list[str]:
    """'detection,fuzzing', one of them, or 'none'."""
    parts = [p.strip().lower() for p in spec.split(",") if p.strip()]
    if parts == ["none"]:
        return []
    bad = [p for p in parts if p not in SCORE_METHODS]
    if bad or not parts:
        raise ConfigError(f"--score {spec!r}: use {', '.join(SCORE_METHODS)} (comma-separated) "
                          "or none")
    return [m for m in SCORE_METHODS if m in parts]


def _llm_module() -> Any:
    """The LLM explainer module, loaded lazily (the pattern explainer needs none of it)."""
    name = "app.pipeline.autointerp.llm_explainer"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise ConfigError(f"LLM explainers are not in this build of saescope ({name} is "
                          "missing); use --explainer pattern") from None


def parse_prompt_style(spec: str | None, *, explainer: str) -> str | None:
    """The LLM explainer's prompt style (None: the default, activations); None for the pattern
    explainer, which has no prompt (ConfigError when one is asked for)."""
    if explainer == "pattern":
        if spec is not None:
            raise ConfigError(f"--prompt-style {spec!r}: the pattern explainer has no prompt; "
                              "use it with --explainer local or openai")
        return None
    styles = _llm_module().PROMPT_STYLES
    style = styles[0] if spec is None else spec.strip().lower()
    if style not in styles:
        raise ConfigError(f"--prompt-style {spec!r}: use {' or '.join(styles)}")
    return style


def llm_explainer(backend: ChatBackend, *, seed: int, style: str = "activations"
                  ) -> Callable[[FeatureDetail], str]:
    """An explain function over `backend` from the LLM explainer module, asking in prompt
    `style` (activations or output, see llm_explainer.py)."""
    module = _llm_module()
    llm_explain = getattr(module, "llm_explain", None)
    if llm_explain is None:
        raise ConfigError(f"{module.__name__} has no llm_explain; use --explainer pattern")
    options = module.ExplainOptions(style=style, chat=ChatOptions(seed=seed))
    return lambda feature: llm_explain(feature, backend, options)


@dataclass(frozen=True)
class ExplainJob:
    sae_id: str
    selection: FeatureSelection = field(default_factory=lambda: FeatureSelection(None))
    explainer: str = "pattern"
    methods: tuple[str, ...] = SCORE_METHODS
    seed: int = 0
    max_features: int | None = None
    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    progress: bool = True
    concurrency: int = 1  # features explained and scored at once (worker threads)


@dataclass
class ExplainSummary:
    asked: int = 0  # alive features selected
    dead: int = 0  # selected features that never fire (not explained)
    finished_before: int = 0  # skipped: already explained and scored with this seed
    reviewed: int = 0  # skipped: a reviewer already acted on the draft
    left: int = 0  # not started because of --max-features
    explained: int = 0
    kept: int = 0  # reviewed while this job ran; left as the reviewer left it
    stopped: str | None = None  # why the job ended before its last feature (the token budget)
    scores: dict[str, list[float]] = field(default_factory=dict)
    controls: dict[str, list[float]] = field(default_factory=dict)


def control_explanation(session: Session, *, feature: FeatureDetail, alive: list[int],
                        seed: int) -> tuple[str, str] | None:
    """A random other live feature's pattern explanation (seeded by seed and feature): the
    'random explanation' every score is compared with."""
    others = [i for i in alive if i != feature.index]
    if not others:
        return None
    rng = np.random.default_rng([seed, feature.index, 2])
    other = others[int(rng.integers(len(others)))]
    detail = queries.get_feature(session=session, sae_id=feature.sae_id, index=other)
    return explain_pattern(detail), f"pattern explanation of feature {other}"


def run_explain(
    engine: Engine, job: ExplainJob, *, explain: Callable[[FeatureDetail], str],
    scorer: ChatBackend | None, negatives: Callable[[], SequencePool] | None,
    log: Callable[[str], None] = print, explainer_details: dict[str, Any] | None = None,
) -> ExplainSummary:
    """Explain, score and store the selected features not finished yet; see the module doc."""
    methods = list(job.methods)
    if methods and scorer is None:
        raise ConfigError("scoring needs a scorer backend (or --score none)")
    summary = ExplainSummary()
    with read_session(engine) as session:
        targets = queries.explain_targets(session=session, sae_id=job.sae_id,
                                          indices=job.selection.indices,
                                          unlabeled=job.selection.unlabeled)
        finished, reviewed = explained_features(
            session=session, sae_id=job.sae_id, explainer=job.explainer, seed=job.seed,
            methods=methods, scorer=scorer.name if scorer is not None else None)
        alive = queries.alive_features(session=session, run_id=targets.run_id) if methods else []
    summary.asked, summary.dead = len(targets.alive), targets.n_dead
    todo = [i for i in targets.alive if i not in finished and i not in reviewed]
    summary.finished_before = sum(i in finished for i in targets.alive)
    summary.reviewed = sum(i in reviewed for i in targets.alive)
    log(f"{summary.asked} live features selected on {job.sae_id}"
        + (f" ({summary.dead} never fire: nothing to explain)" if summary.dead else ""))
    if summary.finished_before:
        scored = f", scored by {scorer.name} ({', '.join(methods)})" if scorer and methods else ""
        log(f"skipping {summary.finished_before} features already explained by "
            f"{automatic_author(job.explainer)} with seed {job.seed}{scored}")
    if summary.reviewed:
        log(f"skipping {summary.reviewed} features whose {automatic_author(job.explainer)} "
            "draft a reviewer already accepted, rejected or flagged")
    if job.max_features is not None and len(todo) > job.max_features:
        summary.left = len(todo) - job.max_features
        todo = todo[:job.max_features]
        log(f"explaining {len(todo)} now (--max-features); {summary.left} left for a later run")
    if not todo:
        log("nothing left to explain")
        return summary
    pool = None
    if DETECTION in methods:
        if negatives is None:
            raise ConfigError("detection scoring needs windows where features are zero")
        pool = negatives()
    bar = _progress(len(todo)) if job.progress else None
    work = partial(_explain_one, engine, job, explain=explain, scorer=scorer, pool=pool,
                   alive=alive)
    try:
        done = (map(work, todo) if job.concurrency <= 1
                else _concurrently(work, todo, workers=job.concurrency))
        for explained in done:
            _store(engine, job, explained, summary=summary, details=explainer_details or {})
            if bar is not None:
                bar.update(1)
    except TokenBudgetExceeded as exc:
        summary.stopped = str(exc)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted after {summary.explained} features; each finished one "
                          "is stored, and the same command resumes with the rest") from None
    finally:
        if bar is not None:
            bar.close()
    return summary


@dataclass(frozen=True)
class Explained:
    """One feature's explanation and scores, not stored yet."""

    index: int
    run_id: int | None
    text: str
    scores: list[ScoreRecord]


def _concurrently(work: Callable[[int], Explained], indices: Iterable[int], *,
                  workers: int) -> Iterator[Explained]:
    """``work(index)`` for each index on ``workers`` threads, yielded as each finishes. The
    first error stops new work; the features in flight finish and are yielded (their tokens
    are spent), then that error is raised."""
    todo = iter(indices)
    error: BaseException | None = None
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="saescope-explain")
    try:
        running: set[Future[Explained]] = set()
        while True:
            while error is None and len(running) < workers:
                index = next(todo, None)
                if index is None:
                    break
                running.add(pool.submit(work, index))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                if future.exception() is None:
                    yield future.result()
                elif error is None:
                    error = future.exception()
        if error is not None:
            raise error
    finally:
        # Ctrl-C or a failed store: nothing new starts; requests in flight end on their own.
        pool.shutdown(wait=False, cancel_futures=True)


def _explain_one(engine: Engine, job: ExplainJob, index: int, *,
                 explain: Callable[[FeatureDetail], str], scorer: ChatBackend | None,
                 pool: SequencePool | None, alive: list[int]) -> Explained:
    with read_session(engine) as session:
        feature = queries.get_feature(session=session, sae_id=job.sae_id, index=index)
        control = (control_explanation(session, feature=feature, alive=alive, seed=job.seed)
                   if job.methods else None)
    text = explain(feature).strip()
    if not text:
        raise ConfigError(f"the {job.explainer} explainer returned an empty explanation for "
                          f"feature {index}")
    scores = [score_explanation(feature, text, method=m, scorer=scorer, seed=job.seed,
                                control=control, negatives=pool, options=job.scoring)
              for m in job.methods] if scorer is not None else []
    return Explained(index, feature.run_id, text, scores)


def _store(engine: Engine, job: ExplainJob, explained: Explained, *, summary: ExplainSummary,
           details: dict[str, Any]) -> None:
    """Write one feature's draft and scores (one transaction) and count it."""
    saved = save_explanation(engine, sae_id=job.sae_id, index=explained.index,
                             explainer=job.explainer,
                             description=explained.text[:MAX_DESCRIPTION], seed=job.seed,
                             run_id=explained.run_id, scores=explained.scores, details=details)
    if saved.action == "kept":
        summary.kept += 1
        return
    summary.explained += 1
    for s in explained.scores:
        if s.score is not None:
            summary.scores.setdefault(s.method, []).append(s.score)
        if s.control_score is not None:
            summary.controls.setdefault(s.method, []).append(s.control_score)


def _progress(total: int) -> Any:
    from tqdm import tqdm

    # tqdm's bar shows the rate (features/s) and the time left.
    return tqdm(total=total, unit="feature", desc="explain", dynamic_ncols=True, mininterval=0.5)
