"""MLflow runs: one per specialist training, one per judged candidate (merge + evaluation +
gate). This module only logs: what a report holds is made by `r2m.evaluation.reporting`.

Metric names a person can filter on: `auc/<task>`, `eer/<task>`, `ap/<task>`,
`video_auc/<task>`, `drop/<task>`, `gain/<set>`, `regression/<task>` (AUC lost against the
champion), `unseen_regression/<set>`, `drop_max`, `drop_mean`, `gain_mean`, `gain_macro`,
`regression_max`, `regression_unseen_macro`, each with `<name>/ci_low` and `<name>/ci_high`
(the 95 % interval), and `gate/passed`, `gate/<rule>`, `gate/<rule>/within_noise`. Tables
(markdown/CSV/JSON) under `tables/`, plots under `plots/`, `report.md`, the checkpoint
(safetensors + sidecar JSON, never a pickle) under `checkpoint/`.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Mapping

from r2m.checkpoint import read_meta, sidecar_path
from r2m.config import Params
from r2m.names import specialist_name
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
        tags.update(family=dataset.family, domain=dataset.domain, dataset_root=params.relative(dataset.root))
    run = c.create_run(experiment_id(params, EXPERIMENT_SPECIALISTS, c),
                       run_name=specialist_name(generator), tags=tags)
    run_id = run.info.run_id
    try:
        _log_params(c, run_id, {"generator": generator, **_flatten("recipe", meta.get("recipe", {}))})
        _log_metrics(c, run_id, {**(meta.get("metrics") or {}), **(extra_metrics or {})})
        for row in meta.get("history", []):
            for k, v in row.items():
                if k not in ("epoch", "member", "step") and isinstance(v, (int, float)) and math.isfinite(v):
                    # a soup's members one after another: `step` counts epochs across them
                    c.log_metric(run_id, f"epoch/{k}", float(v), step=int(row.get("step", row.get("epoch", 0))))
        log_checkpoint(c, run_id, checkpoint)
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")
    return run_id


# ------------------------------------------------------------------------ merge/eval runs


def logged_gate_report(c, run_id: str) -> dict:
    """The gate report a merge run logged (`gate_report.json`), {} when it has none."""
    with tempfile.TemporaryDirectory(prefix="r2m-gate-") as tmp:
        try:
            return json.loads(Path(c.download_artifacts(run_id, "gate_report.json", tmp)).read_text())
        except Exception:  # an old run, or its artifacts are gone: the registry's tags still say the verdict
            return {}


def log_verdict(
    params: Params,
    verdict,
    *,
    checkpoint: Path | str | None = None,
    merge_params: Mapping | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    mlflow_client=None,
) -> str:
    """A finished run in `r2m-merges` for a judged candidate (`r2m.evaluation.judge.Verdict`):
    merge hyperparameters as params; the candidate's numbers with their intervals and the gate
    as metrics; the report `r2m.evaluation.reporting.write` makes as artifacts; the checkpoint.
    Each compared method (WA, TA, ..., All-in-one) gets a nested child run with the same metric
    names, so the MLflow UI compares them side by side. Returns the parent run id."""
    from r2m.evaluation import reporting

    c = mlflow_client or client(params)
    evaluation, roles, gate = verdict.evaluation, verdict.roles, verdict.gate
    candidate = roles.candidate
    exp = experiment_id(params, EXPERIMENT_MERGES, c)
    run_tags = {"r2m.kind": "merge", "candidate": candidate, "gate": "passed" if gate.passed else "failed",
                "gate_reason": gate.reason[:5000], **(tags or {})}
    run = c.create_run(exp, run_name=run_name or f"merge-{candidate}", tags=run_tags)
    run_id = run.info.run_id
    try:
        info = evaluation.models[candidate]
        _log_params(c, run_id, {
            "candidate": candidate,
            "candidate_kind": info.kind,
            "specialists": json.dumps(list(roles.specialists)),
            "n_specialists": str(len(roles.specialists)),
            "champion": str(roles.champion),
            "seen_tasks": json.dumps([t.name for t in evaluation.seen]),
            "unseen_tasks": json.dumps([t.name for t in evaluation.unseen]),
            **_flatten("merge", dict(merge_params or {})),
        })
        _log_metrics(c, run_id, reporting.metrics(verdict))
        with tempfile.TemporaryDirectory(prefix="r2m-run-") as tmp:
            reporting.write(verdict, Path(tmp))
            c.log_artifacts(run_id, tmp)
        if checkpoint is not None:
            log_checkpoint(c, run_id, checkpoint)
        for method in roles.methods:
            if method != candidate:
                child = c.create_run(exp, run_name=method, tags={
                    "mlflow.parentRunId": run_id, "r2m.kind": "comparison", "candidate": method})
                _log_params(c, child.info.run_id, {"method": method, "kind": evaluation.models[method].kind})
                _log_metrics(c, child.info.run_id, reporting.summary_metrics(verdict, method))
                c.set_terminated(child.info.run_id, "FINISHED")
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")
    return run_id
