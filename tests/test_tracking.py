"""MLflow tracking against a real SQLite store in a temp dir: runs, tables, plots, the registry
and its aliases (docs/method.md, "Registry and release"). One store per module: MLflow is slow to start."""

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from r2m.checkpoint import save_checkpoint
from r2m.config import GateConfig, load_params
from r2m.errors import RegistryError
from r2m.evaluation.judge import judge_evaluation
from r2m.evaluation.metrics import task_metrics
from r2m.evaluation.plots import pareto_front
from r2m.evaluation.protocol import Evaluation, ModelInfo, Roles, Task
from r2m.tracking import mlflow_store, registry
from r2m.tracking.runs import log_specialist_run, log_verdict


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    params = load_params(
        root=root, paths={"mlflow_tracking_uri": "sqlite:///mlflow.db", "mlflow_artifacts": "mlartifacts"}
    )
    return params, mlflow_store.client(params)


def _checkpoint(folder: Path, name: str, meta: dict, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {"backbone.w": torch.randn(4, 4, generator=g), "head.weight": torch.randn(2, 4, generator=g),
               "head.bias": torch.zeros(2)}
    path = folder / f"{name}.safetensors"
    save_checkpoint(path, tensors, meta)
    return path


TASKS = [Task("fs-ff", "FS", "ff", "seen"), Task("fr-ff", "FR", "ff", "seen"), Task("gan", "other", "x", "unseen")]
# separation of each model on each task: scores = label * sep + noise
SEPARATION = {
    "specialist-fs-ff": {"fs-ff": 3.0, "fr-ff": 0.5, "gan": 0.8},
    "specialist-fr-ff": {"fs-ff": 0.6, "fr-ff": 3.0, "gan": 0.4},
    "r2m": {"fs-ff": 2.5, "fr-ff": 2.5, "gan": 1.2},
    "wa": {"fs-ff": 1.5, "fr-ff": 2.0, "gan": 0.9},
}


def _evaluation() -> Evaluation:
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], 40)
    groups = [f"src{i // 4}" for i in range(labels.size)]  # four images (two real, two fake) per source
    metrics, scores = {}, {}
    for model, per in SEPARATION.items():
        metrics[model], scores[model] = {}, {}
        for task, sep in per.items():
            s = labels * sep + rng.normal(size=labels.size)
            metrics[model][task] = task_metrics(task, labels, s)
            scores[model][task] = (labels.tolist(), s.tolist())
    models = {m: ModelInfo(m, "specialist" if m.startswith("specialist") else "merged",
                           m.removeprefix("specialist-") if m.startswith("specialist") else None)
              for m in SEPARATION}
    return Evaluation(TASKS, models, metrics, scores, {t.name: groups for t in TASKS})


def _artifacts(c: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for f in c.list_artifacts(run_id, path):
        out |= _artifacts(c, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_store_is_sqlite_with_artifacts_at_the_project_root(store):
    params, c = store
    assert params.tracking_uri == f"sqlite:///{params.root.resolve()}/mlflow.db"
    exp = c.get_experiment(mlflow_store.experiment_id(params, mlflow_store.EXPERIMENT_MERGES, c))
    assert exp.artifact_location.startswith((params.root.resolve() / "mlartifacts").as_uri())
    assert (params.root / "mlflow.db").is_file()
    assert "--backend-store-uri sqlite:///" in mlflow_store.ui_command(params)


def test_merge_run_logs_metrics_tables_plots_and_children(store, tmp_path):
    params, c = store
    evaluation = _evaluation()
    verdict = judge_evaluation(evaluation, Roles("r2m", ("specialist-fs-ff", "specialist-fr-ff"), compared=("wa",)),
                               GateConfig(max_drop=0.5, min_gain_macro=-0.5, min_auc=0.5, interval_resamples=200))
    summary = verdict.summary
    ckpt = _checkpoint(tmp_path, "r2m", {"kind": "merged", "method": "r2m"})
    run_id = log_verdict(params, verdict, checkpoint=ckpt, merge_params={"alpha": 0.5, "rank": 0.7})
    run = c.get_run(run_id)
    m = run.data.metrics
    assert m["auc/fs-ff"] == pytest.approx(evaluation.metrics["r2m"]["fs-ff"].auc)
    assert m["drop/fr-ff"] == pytest.approx(summary.drop["fr-ff"])
    assert m["gain/gan"] == pytest.approx(summary.gain["gan"])
    assert m["drop_max"] == pytest.approx(summary.drop_max)
    assert m["gain_macro"] == pytest.approx(summary.gain_macro)
    # every number carries its 95 % interval
    assert (m["drop_max/ci_low"], m["drop_max/ci_high"]) == pytest.approx(summary.interval("drop_max"))
    assert m["auc/fs-ff/ci_low"] <= m["auc/fs-ff"] <= m["auc/fs-ff/ci_high"]
    assert m["gate/passed"] == 1.0 and "gate/max_drop/within_noise" in m
    assert run.data.params["merge.alpha"] == "0.5"
    assert run.data.tags["gate"] == "passed" and run.info.status == "FINISHED"

    files = _artifacts(c, run_id)
    for expected in ["tables/seen_auc.md", "tables/unseen_auc.csv", "tables/drop.json", "tables/gain.md",
                     "tables/specialist_auc.md", "tables/tables.md", "tables/gate.md", "gate_report.json",
                     "summaries.json", "intervals.json", "metrics.json", "report.md",
                     "plots/drop_heatmap.png", "plots/gain_heatmap.png", "plots/drop_gain_pareto.png",
                     "plots/specialist_auc_heatmap.png", "plots/roc_r2m.png", "plots/roc_task_gan.png",
                     "checkpoint/r2m.safetensors", "checkpoint/r2m.safetensors.json"]:
        assert expected in files, expected
    # the files really are PNGs in the local artifact folder at the project root
    local = Path(run.info.artifact_uri.removeprefix("file://"))
    assert local.is_relative_to(params.root.resolve() / "mlartifacts")
    assert (local / "plots" / "gain_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| r2m |" in (local / "tables" / "seen_auc.md").read_text()

    children = c.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert [r.data.tags["candidate"] for r in children] == ["wa"]
    assert children[0].data.metrics["drop_max"] == pytest.approx(verdict.summaries["wa"].drop_max)
    assert children[0].data.metrics["drop_max/ci_low"] == pytest.approx(verdict.summaries["wa"].interval("drop_max")[0])


def test_pareto_front_keeps_only_undominated_methods():
    points = {"a": (0.01, 0.05), "b": (0.02, 0.01), "c": (0.005, -0.02), "d": (0.03, 0.06)}
    assert set(pareto_front(points)) == {"a", "c", "d"}


def test_specialist_run_and_registered_version_carry_lineage(store, tmp_path):
    params, c = store
    meta = {"kind": "specialist", "generator": "fs-ff", "data_hash": "d" * 64, "theta0_sha256": "t" * 64,
            "recipe": {"lr": 1e-5, "epochs": 3}, "metrics": {"val_auc": 0.93},
            "history": [{"epoch": 1, "val_auc": 0.9}, {"epoch": 2, "val_auc": 0.93}]}
    ckpt = _checkpoint(tmp_path, "fs-ff", meta)
    run_id = log_specialist_run(params, ckpt, mlflow_client=c)
    run = c.get_run(run_id)
    assert run.data.metrics["val_auc"] == pytest.approx(0.93)
    assert run.data.params["recipe.lr"] == "1e-05"
    assert [h.value for h in c.get_metric_history(run_id, "epoch/val_auc")] == [0.9, 0.93]

    mv = registry.register_specialist(c, run_id, {**meta, "sha256": "s" * 64})
    assert mv.name == "specialist-fs-ff"
    assert mv.tags["data_hash"] == "d" * 64 and mv.tags["theta0_sha256"] == "t" * 64
    assert '"epochs": 3' in mv.tags["recipe"]
    # the version's source is the safetensors artifact, loadable without pickle
    local = Path(c.download_artifacts(run_id, "checkpoint", str(tmp_path / "dl")))
    tensors = load_file(str(local / "fs-ff.safetensors"))
    assert set(tensors) == {"backbone.w", "head.weight", "head.bias"}
    assert mv.source == f"runs:/{run_id}/checkpoint"


class _ChampionWriteFails(MlflowClient):
    """The real store, with the write of `champion` failing (e.g. the server went away)."""

    def set_registered_model_alias(self, name, alias, version):
        if alias == registry.CHAMPION:
            raise ConnectionError("store unreachable")
        return super().set_registered_model_alias(name, alias, version)


def test_a_soup_specialist_logs_its_members_epochs_one_after_another(store, tmp_path):
    params, c = store
    history = [{"epoch": e, "member": m, "step": 2 * m + e, "val_auc": v}
               for (m, e), v in zip([(0, 1), (0, 2), (1, 1), (1, 2)], [0.8, 0.9, 0.85, 0.95])]
    meta = {"kind": "specialist", "generator": "fs-ff", "data_hash": "d" * 64, "theta0_sha256": "t" * 64,
            "recipe": {"soup": 2}, "metrics": {"val_auc": 0.96, "soup": 2}, "history": history}
    run_id = log_specialist_run(params, _checkpoint(tmp_path, "fs-ff", meta), mlflow_client=c)
    logged = c.get_metric_history(run_id, "epoch/val_auc")
    assert [(h.step, h.value) for h in sorted(logged, key=lambda h: h.step)] == [(1, 0.8), (2, 0.9), (3, 0.85), (4, 0.95)]
    assert not any(k.startswith(("epoch/member", "epoch/step")) for k in c.get_run(run_id).data.metrics)


def _candidate(c, tmp_path, n: int, passed: bool = True):
    run = c.create_run(c.get_experiment_by_name(mlflow_store.EXPERIMENT_MERGES).experiment_id)
    ckpt = _checkpoint(tmp_path, f"cand{n}", {"kind": "merged", "method": "r2m"}, seed=n)
    c.log_artifact(run.info.run_id, str(ckpt), "checkpoint")
    c.set_terminated(run.info.run_id)
    reason = "gate passed: ..." if passed else "gate failed: max_drop: 0.2000 on fs-ff violates <= 0.1"
    mv = registry.register_candidate(
        c, run.info.run_id, gate_passed=passed, gate_reason=reason, meta={"sha256": f"{n}" * 64},
        specialists={"fs-ff": {"version": 1, "data_hash": "d" * 64}},
    )
    return str(mv.version), mv.tags


def test_aliases_promote_fail_closed_and_roll_back(store, tmp_path):
    params, c = store
    aliases = lambda: {a: registry.alias_version(c, a)  # noqa: E731
                       for a in (registry.CHAMPION, registry.PREVIOUS, registry.CHALLENGER)}

    v1, tags = _candidate(c, tmp_path, 1)
    assert tags["lineage.specialists"] == '{"fs-ff": "1"}' and tags["gate"] == "passed"
    assert aliases() == {"champion": None, "previous-champion": None, "challenger": v1}
    registry.promote(c, v1)
    assert aliases() == {"champion": v1, "previous-champion": None, "challenger": None}

    v2, _ = _candidate(c, tmp_path, 2)
    move = registry.promote(c, v2)
    assert (move.champion, move.previous_champion) == (v2, v1)
    assert aliases() == {"champion": v2, "previous-champion": v1, "challenger": None}

    # a failed gate is registered (tagged with the reason, as challenger) and never touches champion
    v3, tags = _candidate(c, tmp_path, 3, passed=False)
    assert tags["gate"] == "failed" and "max_drop" in tags["gate_reason"]
    assert aliases() == {"champion": v2, "previous-champion": v1, "challenger": v3}
    with pytest.raises(RegistryError, match="failed the gate"):
        registry.promote(c, v3)
    with pytest.raises(RegistryError, match="no version 99"):
        registry.promote(c, 99)
    assert aliases()["champion"] == v2

    # the champion write fails mid-move: champion and previous-champion stay as they were
    v4, _ = _candidate(c, tmp_path, 4)
    broken = _ChampionWriteFails(tracking_uri=params.tracking_uri, registry_uri=params.tracking_uri)
    with pytest.raises(RegistryError, match="could not move 'champion'"):
        registry.promote(broken, v4)
    assert aliases() == {"champion": v2, "previous-champion": v1, "challenger": v4}

    # rollback restores the previous champion, and walks back no further than history goes
    move = registry.rollback(c)
    assert (move.champion, move.replaced) == (v1, v2)
    assert aliases()["champion"] == v1 and aliases()["previous-champion"] is None
    assert registry.get_version(c, v2).tags["rolled_back"] == "true"
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback(c)

    # three promotions deep, two rollbacks walk back two steps
    registry.promote(c, v2)
    registry.promote(c, v4)
    assert registry.rollback(c).champion == v2
    assert registry.rollback(c).champion == v1

    registry.tag_export(c, v1, "o" * 64, onnx_path="deploy/model_repository/r2m_detector/1/model.onnx")
    assert registry.get_version(c, v1).tags["onnx_sha256"] == "o" * 64
    listed = [r for r in registry.describe_models(c) if r["model"] == registry.DETECTOR]
    assert [r["version"] for r in listed] == ["4", "3", "2", "1"]
    assert next(r for r in listed if r["version"] == v1)["aliases"] == ["champion"]


def test_cli_promote_rollback_and_models(store, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from r2m.cli import app

    params, c = store
    monkeypatch.setenv("R2M_PROJECT_ROOT", str(params.root))
    for var in ("MLFLOW_TRACKING_URI", "R2M_MLFLOW_ARTIFACTS", "R2M_PARAMS"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    v5, _ = _candidate(c, tmp_path, 5)
    before = registry.alias_version(c, registry.CHAMPION)

    result = runner.invoke(app, ["promote", v5])
    assert result.exit_code == 0, result.output
    assert f"champion: r2m-detector v{v5} (previous-champion: v{before})" in result.output
    assert registry.alias_version(c, registry.CHAMPION) == v5

    listing = runner.invoke(app, ["models"])
    assert listing.exit_code == 0 and "specialist-fs-ff" in listing.output
    assert any(line.split()[:3] == ["r2m-detector", v5, "champion"] for line in listing.output.splitlines())

    result = runner.invoke(app, ["rollback"])
    assert result.exit_code == 0 and f"champion: r2m-detector v{before}" in result.output
    assert registry.alias_version(c, registry.CHAMPION) == before

    result = runner.invoke(app, ["promote", "3"])  # v3 failed its gate
    assert result.exit_code == 2 and "failed the gate" in result.output
    assert registry.alias_version(c, registry.CHAMPION) == before
