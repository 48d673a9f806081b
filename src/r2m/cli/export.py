"""`r2m export` / `r2m publish`: ONNX export with parity, and publishing to the model repository (issue 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from r2m.cli import command


def _validated(dataset_dirs: list[Path], params) -> list:
    from r2m.data import validate_dataset

    out = []
    for folder in dataset_dirs:
        folder = folder.resolve()
        data_root = params.path("data_root").resolve()
        out.append(validate_dataset(folder, data_root if data_root in folder.parents else folder.parent, params.data))
    return out


@command("export")
def export(
    model: Path = typer.Option(..., "--model", help="Merged (or any detector) checkpoint, .safetensors with sidecar."),
    out: Path = typer.Option(..., "--out", help="ONNX file to write (report: <out>.json; int8: <stem>.int8.onnx)."),
    dataset: Optional[list[Path]] = typer.Option(
        None, "--dataset", help="Generator dataset folder for the AUC parity check (repeat for each seen task)."),
    int8: Optional[bool] = typer.Option(
        None, "--int8/--no-int8", help="Also write the dynamic-int8 challenger (default: export.int8)."),
    model_version: Optional[str] = typer.Option(None, "--model-version", help="Version recorded in the lineage."),
    params_file: Optional[Path] = typer.Option(None, "--params", help="params.yaml to read (default: the project's)."),
) -> None:
    """Export a checkpoint to ONNX and check ONNX Runtime parity against torch.

    One graph (pixel_values [B,3,H,W] -> logits, fake_probability), preprocessing and lineage in
    its metadata, `onnx.checker` full check, max |Δlogit| on a random batch and identical AUC on a
    sample of each --dataset's test split; any failure removes the file and exits 2.
    """
    from r2m.config import load_params
    from r2m.export.onnx_export import export_checkpoint, report_path

    params = load_params(params_file)
    datasets = _validated(dataset or [], params)
    result = export_checkpoint(model, out, params, datasets, int8=int8, model_version=model_version)
    typer.echo(f"{result.onnx_path}: sha256 {result.sha256[:12]}, max |Δlogit| {result.max_abs_diff:.2e}")
    for p in result.parity:
        typer.echo(f"  {p.task}: AUC torch {p.auc_torch:.4f} = onnx {p.auc_onnx:.4f} on {p.n} test images")
    if result.int8_kept is not None:
        typer.echo(f"  int8: {'kept ' + str(result.int8_path) if result.int8_kept else 'not kept'} ({result.int8_reason})")
    typer.echo(f"  report: {report_path(result.onnx_path)}")


@command("publish")
def publish(
    onnx_file: Path = typer.Option(..., "--onnx", help="An ONNX file written by `r2m export`."),
    repository: Optional[Path] = typer.Option(
        None, "--repository", help="Model repository (default: paths.model_repository)."),
    instance_kind: Optional[str] = typer.Option(
        None, "--instance-kind", help="Triton instance group: KIND_AUTO, KIND_GPU or KIND_CPU (default: export.triton_instance_kind)."),
    params_file: Optional[Path] = typer.Option(None, "--params", help="params.yaml to read (default: the project's)."),
) -> None:
    """Publish an exported model as the next version: <repository>/r2m_detector/<version>/model.onnx.

    Atomic (a running `r2m serve` switches to it on its next poll); config.pbtxt is regenerated
    from the model's real inputs and outputs for Triton / KServe.
    """
    from r2m.config import load_params
    from r2m.errors import ConfigError
    from r2m.export.publish import publish as publish_model

    params = load_params(params_file)
    if instance_kind and instance_kind not in ("KIND_AUTO", "KIND_GPU", "KIND_CPU"):
        raise ConfigError(f"--instance-kind '{instance_kind}': expected KIND_AUTO, KIND_GPU or KIND_CPU")
    published = publish_model(onnx_file, repository or params.path("model_repository"), params.export,
                              instance_kind=instance_kind)
    typer.echo(f"published {published.name} version {published.version}: {published.path}")
