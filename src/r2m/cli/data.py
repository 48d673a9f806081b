"""`r2m validate` / `r2m import-deepfakebench`: the data contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from r2m.cli.app import command
from r2m.errors import DatasetError

if TYPE_CHECKING:
    from r2m.data import GeneratorDataset


def _summary(ds: GeneratorDataset) -> str:
    counts = ds.counts()
    splits = "  ".join(f"{s} {c['real']}r/{c['fake']}f" for s, c in counts.items())
    return f"{ds.family}/{ds.domain} {ds.role}  {splits}  data {ds.data_hash[:12]}"


@command("validate")
def validate(
    data_root: Optional[Path] = typer.Argument(
        None, help="Folder of generator datasets (default: paths.data_root of params.yaml)."
    ),
    params_file: Optional[Path] = typer.Option(None, "--params", help="params.yaml to read (default: the project's)."),
) -> None:
    """Validate every generator dataset under the data root against the data contract.

    Prints one line per dataset: OK with its split sizes (real/fake) and data hash, or REJECTED
    with the file at fault and the reason. Read-only: nothing is moved. Exit status 2 if any
    dataset is rejected.
    """
    from r2m.config import load_params
    from r2m.data import validate_data_root

    params = load_params(params_file)
    root = data_root or params.path("data_root")
    if not root.is_dir():
        raise DatasetError(root, "data root is not a folder")
    results = validate_data_root(root, params.data)
    if not results:
        typer.echo(f"no datasets under {root} (a dataset is a folder holding generator.yaml)")
    width = max((len(folder.name) for folder, _ in results), default=0)
    for folder, outcome in results:
        if isinstance(outcome, DatasetError):
            typer.echo(f"REJECTED  {folder.name:<{width}}  {outcome}")
        else:
            typer.echo(f"OK        {folder.name:<{width}}  {_summary(outcome)}")
    rejected = sum(isinstance(o, DatasetError) for _, o in results)
    if rejected:
        typer.echo(f"{rejected} of {len(results)} dataset(s) rejected", err=True)
        raise typer.Exit(code=2)


def _read_label_dict(path: Path) -> dict[str, int]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except (OSError, yaml.YAMLError) as err:
        raise DatasetError(path, f"cannot read label dict: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("label_dict"), dict):
        data = data["label_dict"]  # a whole DeepfakeBench config file
    if not isinstance(data, dict) or not all(v in (0, 1) for v in data.values()):
        raise DatasetError(path, "label dict must map label strings to 0 (real) or 1 (fake)")
    return {str(k): int(v) for k, v in data.items()}


@command("import-deepfakebench")
def import_deepfakebench_cmd(
    json_path: Path = typer.Argument(..., metavar="JSON", help="DeepfakeBench/DF40 dataset JSON file."),
    dataset: str = typer.Option(..., "--dataset", help="Top-level dataset key of the JSON, e.g. FaceForensics++."),
    frames_root: Path = typer.Option(..., "--frames-root", help="Folder the JSON's frame paths are relative to."),
    out: Path = typer.Option(..., "--out", help="Generator dataset folder to create; its name is the dataset name."),
    family: str = typer.Option("other", "--family", help="FS | FR | EFS | FE | other."),
    domain: Optional[str] = typer.Option(None, "--domain", help="Domain, e.g. ff or cdf (default: from --dataset)."),
    role: str = typer.Option("seen", "--role", help="seen (trains a specialist) or unseen (evaluation only)."),
    label: Optional[list[str]] = typer.Option(
        None, "--label", help="Label key(s) to import, e.g. --label FF-real --label FF-DF (default: all)."
    ),
    label_dict: Optional[Path] = typer.Option(
        None, "--label-dict", help="YAML/JSON mapping label strings to 0/1 (or a DeepfakeBench config with label_dict)."
    ),
    compression: str = typer.Option("c23", "--compression", help="Compression level where the JSON has one."),
) -> None:
    """Import a DeepfakeBench/DF40 dataset JSON as a generator dataset, frames used in place.

    Writes only OUT/generator.yaml (samples_root = --frames-root, splits from the JSON); no image
    is copied. Run `r2m validate` afterwards to check every frame.
    """
    from r2m.data import import_deepfakebench, load_manifest

    manifest_path = import_deepfakebench(
        json_path,
        dataset,
        frames_root,
        out,
        family=family,
        domain=domain,
        role=role,
        labels=label or None,
        label_dict=_read_label_dict(label_dict) if label_dict else None,
        compression=compression,
    )
    manifest = load_manifest(manifest_path.parent)
    samples = manifest.samples or []
    per_split = {s: sum(e.split == s for e in samples) for s in ("train", "val", "test")}
    typer.echo(
        f"wrote {manifest_path}: {len(samples)} frames of {len({e.group for e in samples})} videos "
        f"({json.dumps(per_split)}), samples_root {manifest.samples_root}"
    )
