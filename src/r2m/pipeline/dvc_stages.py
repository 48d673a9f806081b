"""The DVC pipeline's stages that need the generator list (`dvc.yaml`; docs/usage.md, "As a DVC pipeline").

`dvc repro` trains one specialist per seen generator of params.yaml `generators` with
`r2m train` (a `foreach` stage each), then runs these, in the same functions as the continual
loop (`r2m.pipeline`), on the files of `artifacts/dvc/` only:

    python -m r2m.pipeline.dvc_stages merge      R²M (α × r chosen on seen val) + the baselines
    python -m r2m.pipeline.dvc_stages evaluate   AUC/DROP/GAIN with intervals, gate verdict -> DVC metrics + plots;
                                                 logged to MLflow (tag r2m.source=dvc) for comparison
    python -m r2m.pipeline.dvc_stages export     ONNX + parity on the seen test splits

DVC reproduces; it does not promote: the registry, `champion` and the deploy repository
belong to the continual loop (`r2m run`, the Prefect flows).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Sequence

from r2m.config import Params, load_params
from r2m.data import GeneratorDataset, discover_datasets, validate_dataset
from r2m.errors import ConfigError, DatasetError
from r2m.models import ensure_pretrained
from r2m.names import specialist_name

CANDIDATE = "r2m"  # the evaluated candidate's model name (the merge method)


def dvc_dir(params: Params) -> Path:
    """Everything `dvc repro` writes besides reports: `artifacts/dvc/`."""
    return params.path("artifacts") / "dvc"


def specialist_path(params: Params, generator: str) -> Path:
    return dvc_dir(params) / "specialists" / f"{generator}.safetensors"


def merged_path(params: Params, method: str) -> Path:
    return dvc_dir(params) / "merged" / f"{method}.safetensors"


def onnx_path(params: Params) -> Path:
    return dvc_dir(params) / "onnx" / "r2m-detector.onnx"


def reports_dir(params: Params) -> Path:
    return params.root / "reports" / "dvc"


def seen_datasets(params: Params) -> list[GeneratorDataset]:
    """The validated datasets of params.yaml `generators` (each must be a seen dataset)."""
    if not params.generators:
        raise ConfigError("params.yaml: 'generators' is empty: list the seen generators DVC trains")
    data_root = params.path("data_root")
    out = []
    for name in params.generators:
        dataset = validate_dataset(data_root / name, data_root, params.data)
        if dataset.role != "seen":
            raise DatasetError(data_root / name, "listed in params.yaml 'generators' but its role is unseen")
        out.append(dataset)
    return out


def unseen_datasets(params: Params) -> list[GeneratorDataset]:
    """Every valid unseen dataset under the data root (the evaluation suite's GAIN sets)."""
    data_root = params.path("data_root")
    out = []
    for folder in discover_datasets(data_root):
        try:
            dataset = validate_dataset(folder, data_root, params.data)
        except DatasetError as err:
            print(f"skipping {folder.name}: {err}", file=sys.stderr)
            continue
        if dataset.role == "unseen":
            out.append(dataset)
    return out


def specialists(params: Params) -> list[Path]:
    paths = [specialist_path(params, g) for g in params.generators]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"{missing[0]}: no specialist; run `dvc repro` (stage train@{missing[0].stem})")
    return paths


# ---------------------------------------------------------------------------------- stages


def merge(params: Params) -> dict[str, Path]:
    """R²M over the listed generators' specialists plus every baseline of `merge.baselines`, each
    with the hyperparameters the continual loop uses (chosen on the seen val splits when
    `merge.select`, never on unseen sets)."""
    from r2m.pipeline.candidate import merge_methods

    merged, _ = merge_methods(params, ensure_pretrained(params), specialists(params), seen_datasets(params),
                              dvc_dir(params) / "merged")
    return merged


def methods(params: Params) -> list[str]:
    """The candidate's method first, then the baselines."""
    return [params.merge.method, *[b for b in params.merge.baselines if b != params.merge.method]]


def write_roc_curves(evaluation, candidate: str, folder: Path) -> list[Path]:
    """One CSV per task (fpr, tpr) of the candidate: `dvc plots show` draws each as a line."""
    from r2m.evaluation.metrics import roc

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for task, (labels, scores) in evaluation.scores.get(candidate, {}).items():
        fpr, tpr = roc(labels, scores, task)
        path = folder / f"{task}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["fpr", "tpr"])
            writer.writerows(zip(fpr.tolist(), tpr.tolist()))
        out.append(path)
    return out


def evaluate(params: Params) -> dict:
    """Judge the merges against the specialists on the seen test splits and the unseen sets
    (`r2m.evaluation.judge`, the loop's own path); write the report (`reports/dvc/`: tables,
    plots, gate report) and `metrics.json` for `dvc metrics show`, ROC CSVs for `dvc plots`;
    log an MLflow merge run (tag r2m.source=dvc) for comparison."""
    from r2m.evaluation import reporting
    from r2m.evaluation.judge import judge
    from r2m.evaluation.protocol import Roles
    from r2m.tracking import runs

    compared = methods(params)
    names = [specialist_name(g) for g in params.generators]
    models = {name: specialist_path(params, g) for name, g in zip(names, params.generators)}
    models.update({m: merged_path(params, m) for m in compared})
    candidate = params.merge.method
    verdict = judge(models, [*seen_datasets(params), *unseen_datasets(params)], params,
                    Roles(candidate, tuple(names), compared=tuple(compared[1:])))
    out = reports_dir(params)
    reporting.write(verdict, out)  # metrics.json, gate_report.json, tables/, plots/, report.md
    write_roc_curves(verdict.evaluation, candidate, out / "roc")
    runs.log_verdict(params, verdict, checkpoint=merged_path(params, candidate), run_name=f"dvc-{candidate}",
                     tags={"r2m.source": "dvc"})
    return {"gate_passed": verdict.passed, "reason": verdict.gate.reason}


def export(params: Params) -> Path:
    """ONNX export of the R²M merge, parity checked on the seen generators' test splits."""
    from r2m.export.onnx_export import export_checkpoint

    result = export_checkpoint(merged_path(params, params.merge.method), onnx_path(params), params,
                               seen_datasets(params))
    return result.onnx_path


STAGES = {"merge": merge, "evaluate": evaluate, "export": export}


def main(argv: Sequence[str] | None = None) -> int:
    from r2m.errors import R2MError

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] not in STAGES:
        print(f"usage: python -m r2m.pipeline.dvc_stages {{{','.join(STAGES)}}}", file=sys.stderr)
        return 2
    try:
        result = STAGES[argv[0]](load_params())
    except R2MError as err:
        print(f"dvc stage {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    print(f"dvc stage {argv[0]}: done: {result if not isinstance(result, dict) else json.dumps(result, default=str)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
