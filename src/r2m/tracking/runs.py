"""MLflow runs: one per specialist training, one per merge + evaluation + gate (SPEC section 7).

Metric names a person can filter on: `auc/<task>`, `eer/<task>`, `ap/<task>`,
`video_auc/<task>`, `drop/<task>`, `gain/<set>`, `regression/<task>`, `drop_max`, `drop_mean`,
`gain_mean`, `gain_macro`, `gate/passed`. Tables (markdown/CSV/JSON) under `tables/`, plots
under `plots/`, the checkpoint (safetensors + sidecar JSON, never a pickle) under `checkpoint/`.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

from r2m.checkpoint import read_meta, sidecar_path
from r2m.config import Params
from r2m.evaluation import protocol
from r2m.evaluation.gate import GateReport
from r2m.evaluation.protocol import Evaluation, ProtocolSummary
from r2m.evaluation.report import Table, write_tables
from r2m.tracking import plots
from r2m.tracking.mlflow_store import EXPERIMENT_MERGES, EXPERIMENT_SPECIALISTS, client, experiment_id
from r2m.tracking.registry import CHECKPOINT_ARTIFACTS, tag_value


def _key(name: str) -> str:
    """MLflow keys allow letters, digits, _ - . space / : keep generator names readable."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def _flatten(prefix: str, value) -> dict[str, str]:
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: json.dumps(value) if isinstance(value, (list, tuple)) else str(value)[:6000]}


def _finite(metrics: Mapping[str, float | None]) -> dict[str, float]:
    return {
        _key(k): float(v) for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def _log_metrics(c, run_id: str, metrics: Mapping[str, float | None]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, 0) for k, v in _finite(metrics).items()]
    for i in range(0, len(batch), 900):  # MLflow's log_batch limit is 1000 metrics
        c.log_batch(run_id, metrics=batch[i:i + 900])


def _log_params(c, run_id: str, values: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(_key(k)[:250], v) for k, v in values.items()]
    for i in range(0, len(items), 90):  # log_batch takes at most 100 params
        c.log_batch(run_id, params=items[i:i + 90])


def _project_relative(params: Params, path: Path | str) -> str:
    """`path` relative to the project root when it lies inside it (runs stay valid when the project moves)."""
    try:
        return str(Path(path).resolve().relative_to(params.root.resolve()))
    except ValueError:
        return str(path)


def log_checkpoint(c, run_id: str, path: Path | str, artifact_path: str = CHECKPOINT_ARTIFACTS) -> None:
    """The safetensors file and its JSON sidecar as run artifacts."""
    path = Path(path)
    c.log_artifact(run_id, str(path), artifact_path)
    if sidecar_path(path).is_file():
        c.log_artifact(run_id, str(sidecar_path(path)), artifact_path)


# ------------------------------------------------------------------------- specialist runs


def log_specialist_run(
    params: Params,
    checkpoint: Path | str,
    *,
    dataset=None,
    extra_metrics: Mapping[str, float] | None = None,
    mlflow_client=None,
) -> str:
    """A finished run in `r2m-specialists` for one trained specialist: recipe as params, its
    validation metrics and per-epoch history, tags (generator, data_hash, θ0 hash, sha256), and
    the checkpoint. Returns the run id (register it with `registry.register_specialist`)."""
    c = mlflow_client or client(params)
    meta = read_meta(checkpoint)
    generator = meta.get("generator") or Path(checkpoint).stem
    tags = {
        "r2m.kind": meta.get("kind", "specialist"),
        "generator": generator,
        "data_hash": tag_value(meta.get("data_hash", "")),
        "theta0_sha256": tag_value(meta.get("theta0_sha256", "")),
        "sha256": tag_value(meta.get("sha256", "")),
    }
    if dataset is not None:
        tags.update(family=dataset.family, domain=dataset.domain, dataset_root=_project_relative(params, dataset.root))
    run = c.create_run(experiment_id(params, EXPERIMENT_SPECIALISTS, c),
                       run_name=f"specialist-{generator}", tags=tags)
    run_id = run.info.run_id
    try:
        _log_params(c, run_id, {"generator": generator, **_flatten("recipe", meta.get("recipe", {}))})
        _log_metrics(c, run_id, {**(meta.get("metrics") or {}), **(extra_metrics or {})})
        for row in meta.get("history", []):
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    c.log_metric(run_id, f"epoch/{k}", float(v), step=int(row.get("epoch", 0)))
        log_checkpoint(c, run_id, checkpoint)
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")
    return run_id


# ------------------------------------------------------------------------ merge/eval runs


def candidate_metrics(evaluation: Evaluation, summary: ProtocolSummary) -> dict[str, float | None]:
    """The candidate's per-task metrics and its DROP/GAIN/regression numbers."""
    out: dict[str, float | None] = {}
    for task, tm in evaluation.metrics.get(summary.candidate, {}).items():
        out[f"auc/{task}"] = tm.auc
        out[f"eer/{task}"] = tm.eer
        out[f"ap/{task}"] = tm.ap
        out[f"video_auc/{task}"] = tm.video_auc
    out.update({f"drop/{t}": v for t, v in summary.drop.items()})
    out.update({f"gain/{t}": v for t, v in summary.gain.items()})
    out.update({f"regression/{t}": v for t, v in summary.regression.items()})
    seen, unseen = list(summary.seen_auc.values()), list(summary.unseen_auc.values())
    out.update(
        drop_max=summary.drop_max,
        drop_mean=summary.drop_mean,
        gain_mean=summary.gain_mean,
        gain_macro=summary.gain_macro,
        auc_seen_mean=sum(seen) / len(seen) if seen else None,
        auc_unseen_mean=sum(unseen) / len(unseen) if unseen else None,
    )
    return out


def gate_metrics(report: GateReport) -> dict[str, float]:
    out = {"gate/passed": 1.0 if report.passed else 0.0}
    for rule in report.rules:
        out[f"gate/{rule.name}"] = rule.value
        out[f"gate/{rule.name}/passed"] = 1.0 if rule.passed else 0.0
    return out


def evaluation_tables(evaluation: Evaluation, methods: Sequence[str], candidate: str) -> list[Table]:
    """The paper's tables for this evaluation: seen / unseen AUC (Tables 1-2), DROP and GAIN
    per method (Tables A.2-A.3), specialists × tasks, and the candidate's full metrics."""
    rows = [*evaluation.of_kind("specialist"), *[m for m in evaluation.metrics
                                                   if m not in evaluation.of_kind("specialist")]]
    tables = [protocol.seen_auc_table(evaluation, rows)]
    if evaluation.unseen:
        tables.append(protocol.unseen_auc_table(evaluation, rows))
    if evaluation.of_kind("specialist"):
        tables.append(protocol.specialist_matrix_table(evaluation))
        if methods:
            tables.append(protocol.drop_table(evaluation, methods))
            if evaluation.unseen:
                tables.append(protocol.gain_table(evaluation, methods))
    tables.append(protocol.metrics_table(evaluation, candidate))
    return tables


def evaluation_plots(evaluation: Evaluation, tables: Sequence[Table], methods: Sequence[str],
                     candidate: str, folder: Path) -> list[Path]:
    """ROC curves (the candidate on every task; every model on each task), the DROP and GAIN
    heatmaps (Fig. 4), the Pareto plot (Fig. 5), the specialists × tasks heatmap."""
    by_name = {t.name: t for t in tables}
    out: list[Path] = []
    cand_scores = evaluation.scores.get(candidate, {})
    if cand_scores:
        out.append(plots.roc_plot(cand_scores, f"ROC: {candidate}", folder / f"roc_{candidate}.png"))
    for task in evaluation.tasks:
        curves = {m: s[task.name] for m, s in evaluation.scores.items() if task.name in s}
        if curves:
            out.append(plots.roc_plot(curves, f"ROC on {task.name} ({task.role})",
                                      folder / f"roc_task_{task.name}.png"))
    if "drop" in by_name:
        out.append(plots.drop_heatmap(by_name["drop"], folder / "drop_heatmap.png"))
    if "gain" in by_name:
        out.append(plots.gain_heatmap(by_name["gain"], folder / "gain_heatmap.png"))
    if "specialist_auc" in by_name:
        out.append(plots.auc_heatmap(by_name["specialist_auc"], folder / "specialist_auc_heatmap.png"))
    if evaluation.of_kind("specialist") and evaluation.unseen and methods:
        points = protocol.pareto_points(evaluation, methods)
        if points:
            out.append(plots.pareto_plot(points, folder / "drop_gain_pareto.png"))
    return out


def flat_metrics(evaluation: Evaluation, summary: ProtocolSummary,
                 gate_report: GateReport | None = None) -> dict[str, float]:
    """Every logged number as one flat dict (MLflow metrics, `dvc metrics show`)."""
    metrics = candidate_metrics(evaluation, summary)
    if gate_report is not None:
        metrics.update(gate_metrics(gate_report))
    return _finite(metrics)


def write_reports(folder: Path, evaluation: Evaluation, summary: ProtocolSummary,
                  gate_report: GateReport | None = None, methods: Sequence[str] | None = None) -> Path:
    """The reports of one evaluation on disk: `tables/` (md, csv, json), `plots/` (png),
    `metrics.json` (flat), `evaluation.json`, `summary.json`, `gate_report.json`. The same files
    a merge run logs to MLflow; DVC stages and Prefect artifacts can point at them."""
    candidate = summary.candidate
    methods = list(methods) if methods is not None else [candidate]
    if candidate not in methods:
        methods.insert(0, candidate)
    tables = evaluation_tables(evaluation, methods, candidate)
    if summary.regression:
        tables.append(protocol.regression_table(summary))
    write_tables(tables, folder / "tables")
    evaluation_plots(evaluation, tables, methods, candidate, folder / "plots")
    docs = {
        "metrics.json": flat_metrics(evaluation, summary, gate_report),
        "evaluation.json": evaluation_dict(evaluation),
        "summary.json": summary.as_dict(),
    }
    if gate_report is not None:
        docs["gate_report.json"] = gate_report.as_dict()
    for name, doc in docs.items():
        (folder / name).write_text(json.dumps(doc, indent=2))
    return folder


def log_merge_run(
    params: Params,
    evaluation: Evaluation,
    summary: ProtocolSummary,
    *,
    gate_report: GateReport | None = None,
    checkpoint: Path | str | None = None,
    methods: Sequence[str] | None = None,
    merge_params: Mapping | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    mlflow_client=None,
) -> str:
    """A finished run in `r2m-merges` for candidate `summary.candidate`: merge hyperparameters
    as params; the candidate's metrics + gate; every table and plot; the checkpoint. Each other
    method in `methods` (WA, TA, ..., All-in-one) gets a nested child run with the same metric
    names, so the MLflow UI compares them side by side. Returns the parent run id."""
    c = mlflow_client or client(params)
    candidate = summary.candidate
    methods = list(methods) if methods is not None else [
        m for m in evaluation.metrics if evaluation.models[m].kind not in ("specialist", "champion")
    ]
    if candidate not in methods:
        methods.insert(0, candidate)
    exp = experiment_id(params, EXPERIMENT_MERGES, c)
    run_tags = {"r2m.kind": "merge", "candidate": candidate, **(tags or {})}
    if gate_report is not None:
        run_tags.update(gate="passed" if gate_report.passed else "failed", gate_reason=gate_report.reason[:5000])
    run = c.create_run(exp, run_name=run_name or f"merge-{candidate}", tags=run_tags)
    run_id = run.info.run_id
    try:
        info = evaluation.models[candidate]
        _log_params(c, run_id, {
            "candidate": candidate,
            "candidate_kind": info.kind,
            "specialists": json.dumps(evaluation.of_kind("specialist")),
            "n_specialists": str(len(evaluation.of_kind("specialist"))),
            "seen_tasks": json.dumps([t.name for t in evaluation.seen]),
            "unseen_tasks": json.dumps([t.name for t in evaluation.unseen]),
            **_flatten("merge", dict(merge_params or {})),
        })
        _log_metrics(c, run_id, flat_metrics(evaluation, summary, gate_report))
        with tempfile.TemporaryDirectory(prefix="r2m-run-") as tmp:
            write_reports(Path(tmp), evaluation, summary, gate_report, methods)
            c.log_artifacts(run_id, tmp)
        if checkpoint is not None:
            log_checkpoint(c, run_id, checkpoint)
        for m in methods:
            if m != candidate:
                _log_child(c, exp, run_id, evaluation, m)
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")
    return run_id


def _log_child(c, experiment: str, parent: str, evaluation: Evaluation, method: str) -> str:
    summary = protocol.summarize(evaluation, method)
    run = c.create_run(experiment, run_name=method, tags={
        "mlflow.parentRunId": parent, "r2m.kind": "comparison", "candidate": method,
    })
    _log_params(c, run.info.run_id, {"method": method, "kind": evaluation.models[method].kind})
    _log_metrics(c, run.info.run_id, candidate_metrics(evaluation, summary))
    c.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def evaluation_dict(evaluation: Evaluation) -> dict:
    """Every number of an evaluation as plain JSON (no raw scores)."""
    return {
        "tasks": [t.__dict__ for t in evaluation.tasks],
        "models": {n: m.__dict__ for n, m in evaluation.models.items()},
        "metrics": {m: {t: tm.as_dict() for t, tm in per.items()} for m, per in evaluation.metrics.items()},
    }
