"""The `r2m` command line: a thin driver over the library, one module per verb."""

from __future__ import annotations

import functools
import sys
from typing import Callable

import typer

from r2m.errors import R2MError

app = typer.Typer(
    name="r2m",
    help=(
        "Keep one deepfake detector up to date as new generators appear: fine-tune one "
        "specialist per generator, merge them training-free with R²M, gate, export to ONNX, serve."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def command(name: str, **kwargs) -> Callable:
    """Register a verb; turn `R2MError` into one line on stderr and exit status 2."""

    def decorator(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except R2MError as err:
                typer.echo(f"r2m {name}: error: {err}", err=True)
                raise typer.Exit(code=2) from None

        app.command(name, **kwargs)(wrapper)
        return wrapper

    return decorator


def not_implemented(verb: str) -> None:
    typer.echo(f"r2m {verb}: not implemented yet", err=True)
    raise typer.Exit(code=3)


# Importing the verb modules registers their commands on `app`.
from r2m.cli import (  # noqa: E402,F401
    data,
    demo_data,
    train,
    merge,
    evaluate,
    registry,
    export,
    serve,
    run,
    external,
)


def main() -> None:
    app(prog_name="r2m")


if __name__ == "__main__":
    main()
    sys.exit(0)
