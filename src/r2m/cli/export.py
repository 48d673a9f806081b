"""`r2m export` / `r2m publish`: ONNX export with parity, and publishing to the model repository (deploy/README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from r2m.cli.app import command


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
        None, "--int8/--no-int8", help="Also write the int8 challenger, kept only within export.int8_auc_tolerance "
                                       "of fp32 on every --dataset's test split (scheme: export.int8_scheme; "
                                       "default: export.int8)."),
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


def _not_gated(onnx_file: Path, params) -> str | None:
    """Why this ONNX file never passed the gate (None when a detector version exported as it did).

    The file's lineage names the checkpoint it was exported from (sha256); the registry's
    `r2m-detector` versions carry the same sha256 and their gate verdict."""
    from r2m.errors import ExportError
    from r2m.export.metadata import read_metadata
    from r2m.tracking import mlflow_store, registry

    if not onnx_file.is_file():
        raise ExportError(f"{onnx_file}: no such ONNX file")
    sha = read_metadata(onnx_file).get("lineage", {}).get("checkpoint_sha256")
    uri = params.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return f"there is no registry yet ({uri}), so no gate ever judged it"
    if not sha:
        return "its lineage names no checkpoint sha256, so no registry version can vouch for it"
    client = mlflow_store.client(params)
    try:
        versions = client.search_model_versions(f"name='{registry.DETECTOR}' and tags.`sha256` = '{sha}'")
    except Exception:  # no detector registered yet
        versions = []
    if any(mv.tags.get("gate") == "passed" for mv in versions):
        return None
    if versions:
        mv = max(versions, key=lambda v: int(v.version))
        return f"{registry.DETECTOR} v{mv.version} failed the gate ({mv.tags.get('gate_reason', 'no reason recorded')})"
    return f"no {registry.DETECTOR} version holds its checkpoint (sha256 {sha[:12]}…), so no gate ever judged it"


@command("publish")
def publish(
    onnx_file: Path = typer.Option(..., "--onnx", help="An ONNX file written by `r2m export`."),
    repository: Optional[Path] = typer.Option(
        None, "--repository", help="Model repository (default: paths.model_repository)."),
    instance_kind: Optional[str] = typer.Option(
        None, "--instance-kind", help="Triton instance group: KIND_AUTO, KIND_GPU or KIND_CPU (default: export.triton_instance_kind)."),
    force: bool = typer.Option(False, "--force", help="Publish even a model that never passed the gate (with a warning)."),
    params_file: Optional[Path] = typer.Option(None, "--params", help="params.yaml to read (default: the project's)."),
) -> None:
    """Publish an exported model as the next version: <repository>/r2m_detector/<version>/model.onnx.

    Only a model whose checkpoint passed the gate (an `r2m-detector` version in the registry
    with its sha256 and gate=passed) is published; anything else is refused unless --force.
    Atomic (a running `r2m serve` switches to it on its next poll); config.pbtxt is regenerated
    from the model's real inputs and outputs for Triton / KServe.
    """
    from r2m.config import load_params
    from r2m.errors import ConfigError, RegistryError
    from r2m.export.publish import publish as publish_model

    params = load_params(params_file)
    if instance_kind and instance_kind not in ("KIND_AUTO", "KIND_GPU", "KIND_CPU"):
        raise ConfigError(f"--instance-kind '{instance_kind}': expected KIND_AUTO, KIND_GPU or KIND_CPU")
    why = _not_gated(onnx_file, params)
    if why and not force:
        raise RegistryError(f"{onnx_file}: refusing to serve a model that never passed the gate: {why}; "
                            "publish it anyway with --force")
    if why:
        typer.echo(f"r2m publish: warning: {onnx_file} never passed the gate ({why}); publishing it (--force)", err=True)
    published = publish_model(onnx_file, repository or params.path("model_repository"), params.export,
                              instance_kind=instance_kind)
    typer.echo(f"published {published.name} version {published.version}: {published.path}")
