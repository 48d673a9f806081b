"""`r2m run`: the whole continual loop once (issue 7)."""

from __future__ import annotations

from pathlib import Path

import typer

from r2m.cli import command


@command("run")
def run(
    params_file: Path = typer.Option(None, "--params", help="params.yaml to read (default: the project's)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run the continual loop once on the configured data root.

    Validates every generator dataset (bad ones are quarantined), then onboards the new seen
    generators one at a time: fine-tunes and registers its specialist, re-merges all accepted
    specialists with R²M, evaluates and gates the candidate in MLflow, and — only if it passes —
    exports it to ONNX, moves `champion` and publishes it to the model repository. Running again
    with nothing new changes nothing.
    """
    from r2m.config import load_params
    from r2m.export.runtime import import_onnxruntime

    import_onnxruntime()  # the release step needs it: say so before hours of training, not after
    from r2m.pipeline import run_once

    params = load_params(params_file)
    report = run_once(params, progress=not quiet)
    for line in report.lines():
        typer.echo(line)
