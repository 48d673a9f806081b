"""`r2m promote` / `r2m rollback` / `r2m models`: the detector's MLflow aliases."""

from __future__ import annotations

from pathlib import Path

import typer

from r2m.cli.app import command

PARAMS = typer.Option(None, "--params", help="params.yaml to read (default: the project's).")


def _client(params_file: Path | None):
    from r2m.config import load_params
    from r2m.tracking.mlflow_store import client

    return client(load_params(params_file))


@command("promote")
def promote(
    version: str = typer.Argument(..., help="The r2m-detector version to make champion."),
    force: bool = typer.Option(False, "--force", help="Promote even a version whose gate failed."),
    params_file: Path = PARAMS,
) -> None:
    """Move `champion` to a detector version (the old champion becomes `previous-champion`);
    the model repository then serves it."""
    from r2m.config import load_params
    from r2m.pipeline import promotion
    from r2m.tracking import registry
    from r2m.tracking.mlflow_store import client

    params = load_params(params_file)
    move, served = promotion.promote(params, client(params), version, force=force)
    if not move.changed:
        typer.echo(f"{registry.DETECTOR} v{move.champion} is already champion")
    else:
        typer.echo(f"champion: {registry.DETECTOR} v{move.champion} "
                   f"(previous-champion: {'v' + move.previous_champion if move.previous_champion else 'none'})")
    _echo_served(served)


def _echo_served(served) -> None:
    if served is not None:
        typer.echo(f"serving: {served.parent.parent.name}/{served.parent.name} ({served})")


@command("rollback")
def rollback(params_file: Path = PARAMS) -> None:
    """Move `champion` back to `previous-champion`; the model repository then serves it."""
    from r2m.config import load_params
    from r2m.pipeline import promotion
    from r2m.tracking import registry
    from r2m.tracking.mlflow_store import client

    params = load_params(params_file)
    move, served = promotion.rollback(params, client(params))
    typer.echo(f"champion: {registry.DETECTOR} v{move.champion} (was v{move.replaced}; "
               f"previous-champion: {'v' + move.previous_champion if move.previous_champion else 'none'})")
    _echo_served(served)


@command("models")
def models(params_file: Path = PARAMS) -> None:
    """List registered models: versions, aliases, verdicts and hashes.

    The verdict of a detector version is its gate (passed / failed); of a specialist, its own
    checks (accepted / rejected)."""
    from r2m.tracking import registry

    rows = registry.describe_models(_client(params_file))
    if not rows:
        typer.echo("no registered model yet")
        return
    header = ["model", "version", "aliases", "verdict", "sha256", "onnx_sha256"]
    typer.echo("  ".join(f"{h:<22}" if h == "model" else f"{h:<14}" for h in header))
    for r in rows:
        cells = [r["model"], r["version"], ",".join(r["aliases"]) or "-", r["verdict"] or "-",
                 r["sha256"] or "-", r["onnx_sha256"] or "-"]
        typer.echo("  ".join(f"{c:<22}" if i == 0 else f"{c:<14}" for i, c in enumerate(cells)))
