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

from app.errors import SaescopeError

app = typer.Typer(
    help="saescope: explore, label and steer sparse-autoencoder features of language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print domain errors as one line on stderr and exit 2 instead of a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SaescopeError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.secho("interrupted; a later run with the same arguments resumes", err=True)
            sys.exit(130)

    return wrapper


@app.command("models")
@clean_errors
def models_command() -> None:
    """List the model presets (names usable wherever a --model is asked)."""
    from app.engine.presets import list_presets

    for preset in list_presets():
        typer.echo(f"{preset.name:16s} {preset.architecture:8s} {preset.default_hook:28s} "
                   f"{preset.description}")
