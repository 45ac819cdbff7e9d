"""`saescope explain`: automatic descriptions of an SAE's features as scored draft labels.

A thin wrapper over app/pipeline/autointerp/explain_job.py; app/cli.py registers it (and turns
domain errors into one line and exit code 2). Every check that needs no model runs first: the
feature list, the score methods, the explainer, the database and the SAE.
"""

from __future__ import annotations

from typing import Any

import typer


def _open_database(url: str) -> Any:
    from sqlalchemy.exc import OperationalError

    from app.errors import ConfigError
    from app.store.db import display_url, make_engine, upgrade

    try:
        upgrade(url)
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise ConfigError(f"cannot open the database {display_url(url)}: {reason}") from None
    return make_engine(url)


def explain_command(
    sae: str = typer.Option(..., "--sae", help="SAE id in the database (saescope serve lists "
                            "them on its home page)"),
    db: str = typer.Option(None, "--db", help="database URL (default: SAESCOPE_DATABASE_URL "
                           "or sqlite:///data/saescope.db)"),
    features: str = typer.Option("all", "--features", help="all, unlabeled (no shown label), "
                                 "or indices and ranges such as 0-499 or 1,5,9"),
    explainer: str = typer.Option("pattern", "--explainer", help="pattern (no model), local "
                                  "(a model loaded here) or openai (an OpenAI-compatible "
                                  "endpoint)"),
    explainer_model: str = typer.Option(None, "--explainer-model", help="local: a preset, "
                                        "folder or .gguf (default: the demo model); openai: "
                                        "the model name the endpoint serves"),
    explainer_url: str = typer.Option(None, "--explainer-url", help="openai: the endpoint's "
                                      "base URL, e.g. http://127.0.0.1:8080/v1"),
    prompt_style: str = typer.Option(None, "--prompt-style", help="local and openai: what the "
                                     "LLM is shown, activations (examples with the active "
                                     "tokens marked; the default) or output (the tokens the "
                                     "feature promotes and suppresses)"),
    scorer: str = typer.Option(None, "--scorer", help="local or openai (default: the "
                               "explainer's backend; local for the pattern explainer)"),
    scorer_model: str = typer.Option(None, "--scorer-model", help="as --explainer-model, for "
                                     "the scorer (default: the explainer's when both use the "
                                     "same backend)"),
    scorer_url: str = typer.Option(None, "--scorer-url", help="as --explainer-url, for the "
                                   "scorer"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="openai: the "
                                    "environment variable holding the API key"),
    score: str = typer.Option("detection,fuzzing", "--score", help="detection, fuzzing, both "
                              "(comma-separated) or none"),
    max_features: int = typer.Option(None, "--max-features", min=1, help="explain at most "
                                     "this many features in this run (the rest: a later run)"),
    max_tokens: int = typer.Option(None, "--max-tokens", min=1, help="stop once the explainer "
                                   "and scorer have used this many tokens in all (prompt and "
                                   "reply); finished features are kept, a rerun goes on"),
    concurrency: int = typer.Option(1, "--concurrency", min=1, max=64, help="features "
                                    "explained and scored at once: requests in flight to an "
                                    "openai endpoint (a local model answers one at a time)"),
    seed: int = typer.Option(0, "--seed", min=0, help="seed for the sampled windows and the "
                             "LLM's sampling; a rerun with the same seed skips finished "
                             "features"),
    pool_sequences: int = typer.Option(64, "--pool-sequences", min=1, help="stored sequences "
                                       "encoded to find windows where a feature is zero "
                                       "(detection)"),
    device: str = typer.Option("auto", "--device", help="where the SAE's model runs to encode "
                               "the pool: auto (CUDA when torch sees a GPU, else cpu), cpu, cuda "
                               "or cuda:N"),
    dtype: str = typer.Option("float32", "--dtype", help="that model's forward dtype: float32, "
                              "bfloat16 or float16 (the SAE encodes float32)"),
) -> None:
    """Explain features automatically, score each explanation (detection, fuzzing, with a
    random-explanation control) and store it as a draft label by autointerp:EXPLAINER.

    Drafts never replace a person's label and are not shown until a reviewer accepts one.
    Resumable: a rerun skips features already explained and scored with the same seed."""
    from app.engine.devices import resolve_device, resolve_dtype
    from app.errors import ConfigError
    from app.pipeline.autointerp.explain_job import (
        EXPLAINERS,
        ExplainJob,
        parse_features,
        parse_methods,
        parse_prompt_style,
    )
    from app.settings import get_settings
    from app.store import queries
    from app.store.db import read_session

    resolve_device(device)  # a bad value: one line before anything runs
    resolve_dtype(dtype)
    selection = parse_features(features)
    methods = parse_methods(score)
    if explainer not in EXPLAINERS:
        raise ConfigError(f"--explainer {explainer!r}: use one of {', '.join(EXPLAINERS)}")
    style = parse_prompt_style(prompt_style, explainer=explainer)
    scorer_kind = scorer or ("local" if explainer == "pattern" else explainer)
    if concurrency > 1 and "openai" not in (explainer, scorer_kind if methods else None):
        raise ConfigError("--concurrency sends requests to an openai endpoint at once; a local "
                          "model answers one at a time (use --explainer or --scorer openai)")
    settings = get_settings()
    engine = _open_database(db or settings.db_url)
    try:
        with read_session(engine) as session:  # an unknown SAE or bad indices: one line
            queries.explain_targets(session=session, sae_id=sae, indices=selection.indices,
                                    unlabeled=selection.unlabeled)
        _run(engine, job=ExplainJob(sae_id=sae, selection=selection, explainer=explainer,
                                    methods=tuple(methods), seed=seed,
                                    max_features=max_features, concurrency=concurrency),
             explainer_opts={"model": explainer_model, "url": explainer_url,
                             "api_key_env": api_key_env, "max_total_tokens": max_tokens},
             scorer_kind=scorer_kind if methods else None,
             scorer_opts={"model": scorer_model, "url": scorer_url, "api_key_env": api_key_env,
                          "max_total_tokens": max_tokens},
             prompt_style=style,
             pool_sequences=pool_sequences, cache_dir=settings.cache_dir,
             device=device, dtype=dtype)
    finally:
        engine.dispose()


def _run(engine: Any, *, job: Any, explainer_opts: dict[str, Any], scorer_kind: str | None,
         scorer_opts: dict[str, Any], pool_sequences: int, cache_dir: Any, device: str = "cpu",
         dtype: str = "float32", prompt_style: str | None = None) -> None:
    from app.pipeline.autointerp.backends import make_backend
    from app.pipeline.autointerp.explain_job import llm_explainer, run_explain
    from app.pipeline.autointerp.negatives import pool_from_store
    from app.pipeline.autointerp.pattern import explain_pattern

    explainer_backend = None
    details: dict[str, Any] = {"explainer": job.explainer}
    if job.explainer == "pattern":
        explain = explain_pattern
    else:
        style = prompt_style or "activations"
        explainer_backend = make_backend(job.explainer, **explainer_opts)
        explain = llm_explainer(explainer_backend, seed=job.seed, style=style)
        details["backend"] = explainer_backend.name
        details["prompt_style"] = style
    scorer = None
    if scorer_kind is not None:
        overrides = {k: v for k, v in scorer_opts.items() if v is not None}
        if scorer_kind == job.explainer and explainer_backend is not None:
            # The explainer's backend scores too, unless the scorer names another model or URL.
            scorer = explainer_backend if not overrides.keys() & {"model", "url"} else \
                make_backend(scorer_kind, **{**explainer_opts, **overrides})
        else:
            scorer = make_backend(scorer_kind, **overrides)
    if explainer_backend is not None and scorer is not None and scorer is not explainer_backend:
        # --max-tokens bounds the run: both backends count against one budget.
        scorer.usage = explainer_backend.usage
    summary = run_explain(
        engine, job, explain=explain, scorer=scorer,
        negatives=lambda: pool_from_store(engine, sae_id=job.sae_id, n_sequences=pool_sequences,
                                          seed=job.seed, cache_dir=cache_dir, log=typer.echo,
                                          device=device, dtype=dtype),
        log=typer.echo, explainer_details=details)
    line = f"explained {summary.explained} features"
    for method, values in summary.scores.items():
        controls = summary.controls.get(method, [])
        line += f"; {method} mean {sum(values) / len(values):.3f}"
        if controls:
            line += f" (random-explanation control {sum(controls) / len(controls):.3f})"
    if summary.kept:
        line += f"; {summary.kept} drafts reviewed meanwhile were left as they are"
    typer.echo(line)
    if summary.stopped:
        typer.echo(f"stopped early: {summary.stopped} (--max-tokens); the features finished "
                   "are stored: run the same command with a larger --max-tokens to go on")
