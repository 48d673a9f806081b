"""`r2m evaluate` and `r2m gate`: protocol tables, DROP/GAIN and the gate (issue 5)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from r2m.cli import command

MODEL = typer.Option(..., "--model", help="The candidate checkpoint (.safetensors) to score.")
DATASETS = typer.Argument(..., help="Generator dataset folders (generator.yaml, real/, fake/); seen and unseen.")
SPECIALISTS = typer.Option(
    None, "--specialist", help="A specialist checkpoint (repeat); enables DROP on seen and GAIN on unseen sets."
)
BASELINES = typer.Option(
    None, "--baseline", help="Another model to score side by side (repeat): WA, TA, TIES, CART, All-in-one..."
)
CHAMPION = typer.Option(None, "--champion", help="The current champion's checkpoint: adds the regression check.")
JSON_OUT = typer.Option(None, "--json", help="Write every number (metrics, DROP/GAIN, gate) to this JSON file.")
LOG = typer.Option(False, "--log", help="Also log the evaluation as a run in the MLflow store.")
PARAMS = typer.Option(None, "--params", help="params.yaml to read (default: the project's).")


def _run(model, datasets, specialists, baselines, champion, json_out, log, params_file, gate: bool) -> bool:
    """Score, print the tables, optionally apply the gate; returns the verdict (True without gate)."""
    from r2m.config import load_params
    from r2m.data import validate_dataset
    from r2m.errors import EvaluationError
    from r2m.evaluation import protocol
    from r2m.evaluation.gate import check_gate
    from r2m.evaluation.scoring import default_model_name, evaluate_models

    params = load_params(params_file)
    data_root = params.path("data_root").resolve()
    loaded = []
    for folder in datasets:
        folder = folder.resolve()
        loaded.append(validate_dataset(folder, data_root if data_root in folder.parents else folder.parent, params.data))

    models: dict[str, Path] = {}
    kinds: dict[str, str] = {}

    def add(path: Path, kind: str | None = None) -> str:
        name = default_model_name(path)
        if name in models:
            name = path.name.removesuffix(".safetensors")
        if name in models:
            raise EvaluationError(f"{path}: two models are called '{name}'; rename one file")
        models[name] = path
        if kind:
            kinds[name] = kind
        return name

    specialist_names = [add(p, "specialist") for p in specialists or []]
    # a specialist passed as --model/--baseline is scored as a model, never as a DROP reference
    candidate = add(model, "candidate")
    methods = [candidate, *(add(p, "baseline") for p in baselines or [])]
    champion_name = add(champion, "champion") if champion else None
    evaluation = evaluate_models(models, loaded, params, kinds=kinds)

    tables = [protocol.metrics_table(evaluation, candidate), protocol.seen_auc_table(evaluation)]
    if evaluation.unseen:
        tables.append(protocol.unseen_auc_table(evaluation))
    summary = protocol.summarize(evaluation, candidate, specialists=specialist_names, champion=champion_name)
    if specialist_names:
        tables.append(protocol.drop_table(evaluation, methods))
        if evaluation.unseen:
            tables.append(protocol.gain_table(evaluation, methods))
    if champion_name:
        tables.append(protocol.regression_table(summary))
    for table in tables:
        typer.echo(table.to_markdown())
    report = check_gate(summary, params.gate) if gate else None
    if report is not None:
        for rule in report.rules:
            typer.echo(f"  [{'ok' if rule.passed else 'FAIL'}] {rule.describe()}")
        for skipped in report.skipped:
            typer.echo(f"  [skip] {skipped}")
        typer.echo(report.reason)
    if json_out:
        from r2m.tracking.runs import evaluation_dict

        doc = {"evaluation": evaluation_dict(evaluation), "summary": summary.as_dict(),
               "gate": report.as_dict() if report else None}
        Path(json_out).write_text(json.dumps(doc, indent=2))
    if log:
        from r2m.tracking.runs import log_merge_run

        run_id = log_merge_run(params, evaluation, summary, gate_report=report, methods=methods,
                               run_name=f"evaluate-{candidate}")
        typer.echo(f"logged MLflow run {run_id} ({params.tracking_uri})")
    return report.passed if report else True


@command("evaluate")
def evaluate(
    datasets: list[Path] = DATASETS,
    model: Path = MODEL,
    specialists: list[Path] = SPECIALISTS,
    baselines: list[Path] = BASELINES,
    champion: Path = CHAMPION,
    gate: bool = typer.Option(False, "--gate", help="Apply the gate of params.yaml; exit 1 if it fails."),
    json_out: Path = JSON_OUT,
    log: bool = LOG,
    params_file: Path = PARAMS,
) -> None:
    """Score a checkpoint on generator datasets: per-task AUC, EER, AP, video AUC (+ DROP/GAIN
    with specialists, + regression with a champion, + the gate with --gate)."""
    if not _run(model, datasets, specialists, baselines, champion, json_out, log, params_file, gate):
        raise typer.Exit(code=1)


@command("gate")
def gate_cmd(
    datasets: list[Path] = DATASETS,
    model: Path = MODEL,
    specialists: list[Path] = SPECIALISTS,
    baselines: list[Path] = BASELINES,
    champion: Path = CHAMPION,
    json_out: Path = JSON_OUT,
    log: bool = LOG,
    params_file: Path = PARAMS,
) -> None:
    """`r2m evaluate --gate`: print the verdict of the gate (thresholds in params.yaml `gate:`);
    exit status 1 when the candidate fails it."""
    if not _run(model, datasets, specialists, baselines, champion, json_out, log, params_file, True):
        raise typer.Exit(code=1)
