"""`r2m run`: the whole continual loop once."""

from __future__ import annotations

from pathlib import Path

import typer

from r2m.cli.app import command


@command("run")
def run(
    params_file: Path = typer.Option(None, "--params", help="params.yaml to read (default: the project's)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Refuse (exit 2) instead of waiting when another "
                                 "run holds the project lock (artifacts/.r2m.lock, and with a tracking "
                                 "server the registry lock r2m-loop-lock)."),
) -> None:
    """Run the continual loop once on the configured data root.

    Validates every generator dataset (bad ones are quarantined), then onboards the new seen
    generators one at a time: fine-tunes and registers its specialist, re-merges all accepted
    specialists with R²M, evaluates and gates the candidate in MLflow, and — only if it passes —
    exports it to ONNX, moves `champion` and publishes it to the model repository. Running again
    with nothing new changes nothing. One run at a time per project, and per tracking server
    (MLFLOW_TRACKING_URI=http://...): a second `r2m run` (or a flow run), on this machine or
    another, waits for the first to finish, then finds its work done. Training runs in this
    process; to train a backlog in parallel on a Prefect work pool, set `flow.work_pool` and run
    the watcher flow (docs/usage.md, "Training on a work pool").
    """
    from r2m.config import load_params
    from r2m.runtime.session import import_onnxruntime

    import_onnxruntime()  # the release step needs it: say so before hours of training, not after
    from r2m.pipeline import run_once

    params = load_params(params_file)
    report = run_once(params, progress=not quiet, wait=not no_wait,
                      on_wait=lambda line: typer.echo(f"r2m run: {line}", err=True))
    for line in report.lines():
        typer.echo(line)
