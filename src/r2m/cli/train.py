"""`r2m train`: fine-tune one specialist."""

from __future__ import annotations

from pathlib import Path

import typer

from r2m.cli.app import command


@command("train")
def train(
    generator_dir: Path = typer.Argument(..., help="A generator dataset folder (holds generator.yaml, real/, fake/)."),
    out: Path = typer.Option(..., "--out", help="Specialist checkpoint to write (.safetensors; sidecar <out>.json)."),
    params_file: Path = typer.Option(None, "--params", help="params.yaml to read (default: the project's)."),
) -> None:
    """Fine-tune one specialist for a generator dataset from θ0 (DF40 recipe from params.yaml).

    Validates the dataset first (a bad dataset is reported, nothing is written), writes θ0 once
    under artifacts/pretrained/, prints per-epoch train loss and validation AUC.
    """
    from r2m.config import load_params
    from r2m.data import validate_dataset
    from r2m.models import ensure_pretrained
    from r2m.training import train_specialist

    params = load_params(params_file)
    generator_dir = generator_dir.resolve()
    data_root = params.path("data_root").resolve()
    if data_root not in generator_dir.parents:
        data_root = generator_dir.parent
    dataset = validate_dataset(generator_dir, data_root, params.data)
    pretrained = ensure_pretrained(params)
    result = train_specialist([dataset], params, out, pretrained=pretrained, name=dataset.name)
    m = result.metrics
    typer.echo(
        f"{dataset.name}: val AUC {m['val_auc']:.4f}, train loss {m['train_loss']:.4f}, "
        f"{m['train_seconds']:.1f} s ({m['images_per_s']:.0f} img/s) -> {result.path}"
    )
