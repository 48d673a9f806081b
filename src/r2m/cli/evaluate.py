"""`r2m evaluate` and `r2m gate`: the loop's judgement of a candidate (`r2m.evaluation.judge`) and its
report (`r2m.evaluation.reporting`): AUC tables, DROP/GAIN and regression with 95 % intervals, the gate."""

from __future__ import annotations

from pathlib import Path

import typer

from r2m.cli.app import command

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
    """Judge (the loop's own path), print the report; returns the verdict (True without --gate)."""
    from r2m.config import load_params
    from r2m.data import validate_dataset
    from r2m.errors import EvaluationError
    from r2m.evaluation import reporting
    from r2m.evaluation.judge import judge
    from r2m.evaluation.protocol import Roles
    from r2m.evaluation.scoring import default_model_name
    from r2m.fileio import atomic_write_json

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
    compared = [add(p, "baseline") for p in baselines or []]
    champion_name = add(champion, "champion") if champion else None
    roles = Roles(candidate, tuple(specialist_names), champion_name, tuple(compared))
    verdict = judge(models, loaded, params, roles, kinds=kinds)
    typer.echo(reporting.render(verdict, gate=gate))
    if json_out:
        doc = {"evaluation": reporting.evaluation_dict(verdict.evaluation),
               "summary": verdict.summary.as_dict(),
               "summaries": {m: s.as_dict() for m, s in verdict.summaries.items()},
               "intervals": reporting.intervals_dict(verdict),
               "gate": verdict.gate.as_dict() if gate else None}
        atomic_write_json(json_out, doc, sort_keys=False)
    if log:
        from r2m.tracking.runs import log_verdict

        run_id = log_verdict(params, verdict, run_name=f"evaluate-{candidate}")
        typer.echo(f"logged MLflow run {run_id} ({params.tracking_uri})")
    return verdict.passed if gate else True


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


def _gated(fn):
    """`fn` with `gate=True` and without its --gate option: `r2m gate` is `r2m evaluate --gate`."""
    import functools
    import inspect

    @functools.wraps(fn)
    def wrapper(**kwargs):
        return fn(**kwargs, gate=True)

    signature = inspect.signature(fn)
    wrapper.__signature__ = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "gate"])
    wrapper.__doc__ = """`r2m evaluate --gate`: print the verdict of the gate (thresholds in params.yaml `gate:`),
    every rule with its 95 % interval; exit status 1 when the candidate fails it."""
    return wrapper


command("evaluate")(evaluate)
command("gate")(_gated(evaluate))
