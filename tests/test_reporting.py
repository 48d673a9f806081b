"""A verdict as people read it (`r2m.evaluation.reporting`): the paper's table shapes, every AUC,
DROP, GAIN and regression with its interval, the gate's lines, and the files of a report."""

import json

import numpy as np
import pytest

from r2m.config import GateConfig
from r2m.evaluation import reporting
from r2m.evaluation.judge import judge_evaluation
from r2m.evaluation.metrics import task_metrics
from r2m.evaluation.protocol import Evaluation, ModelInfo, Roles, Task

TASKS = [Task("fs-ff", "FS", "ff", "seen"), Task("fr-ff", "FR", "ff", "seen"), Task("fs-cdf", "FS", "cdf", "seen"),
         Task("gan", "other", "x", "unseen"), Task("diff", "other", "y", "unseen")]
SEPARATION = {
    "specialist-fs-ff": {"fs-ff": 3.0, "fr-ff": 0.5, "fs-cdf": 2.0, "gan": 0.8, "diff": 0.2},
    "specialist-fr-ff": {"fs-ff": 0.6, "fr-ff": 3.0, "fs-cdf": 0.4, "gan": 0.4, "diff": 1.5},
    "r2m": {"fs-ff": 2.6, "fr-ff": 2.5, "fs-cdf": 1.8, "gan": 1.0, "diff": 1.2},
    "wa": {"fs-ff": 1.5, "fr-ff": 2.0, "fs-cdf": 1.0, "gan": 0.9, "diff": 0.9},
    "champion": {"fs-ff": 2.8, "fr-ff": 2.4, "fs-cdf": 1.9, "gan": 1.0, "diff": 1.6},
}
KINDS = {"specialist-fs-ff": ("specialist", "fs-ff"), "specialist-fr-ff": ("specialist", "fr-ff"),
         "r2m": ("merged", None), "wa": ("merged", None), "champion": ("champion", None)}


@pytest.fixture(scope="module")
def verdict():
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], 60)
    groups = [f"src{i // 4}" for i in range(labels.size)]
    metrics, scores = {}, {}
    for model, per in SEPARATION.items():
        metrics[model], scores[model] = {}, {}
        for task, sep in per.items():
            s = labels * sep + rng.normal(size=labels.size)
            metrics[model][task] = task_metrics(task, labels, s, groups)
            scores[model][task] = (labels.tolist(), s.tolist())
    ev = Evaluation(TASKS, {m: ModelInfo(m, *KINDS[m]) for m in SEPARATION}, metrics, scores,
                    {t.name: groups for t in TASKS})
    roles = Roles("r2m", ("specialist-fs-ff", "specialist-fr-ff"), "champion", ("wa",))
    return judge_evaluation(ev, roles, GateConfig(interval_resamples=300))


def test_tables_have_the_papers_shape_with_intervals(verdict):
    seen = reporting.seen_auc_table(verdict)
    # columns grouped by domain, each followed by its mean (Table 1)
    assert list(seen.columns) == ["fs-cdf", "cdf mean", "fr-ff", "fs-ff", "ff mean"]
    auc = verdict.evaluation.auc()
    assert seen.cell("r2m", "ff mean") == pytest.approx((auc["r2m"]["fr-ff"] + auc["r2m"]["fs-ff"]) / 2)
    low, high = seen.interval("r2m", "ff mean")
    assert low <= seen.cell("r2m", "ff mean") <= high
    assert list(seen.rows)[:2] == ["specialist-fs-ff", "specialist-fr-ff"]  # specialists first

    unseen = reporting.unseen_auc_table(verdict)
    assert list(unseen.columns) == ["gan", "diff", "mean"]
    assert unseen.interval("champion", "mean") is not None

    drop = reporting.drop_table(verdict)
    assert list(drop.rows) == ["fs-ff", "fr-ff", "fs-cdf", "mean", "max"] and list(drop.columns) == ["r2m", "wa"]
    assert drop.cell("max", "wa") == pytest.approx(verdict.summaries["wa"].drop_max)
    assert drop.interval("max", "r2m") == pytest.approx(verdict.summary.interval("drop_max"))
    gain = reporting.gain_table(verdict)
    assert gain.cell("macro", "r2m") == pytest.approx(verdict.summary.gain_macro)
    md = drop.to_markdown()
    v, (lo, hi) = drop.cell("max", "r2m"), drop.interval("max", "r2m")
    assert f"| {v:.3f} [{lo:.3f}, {hi:.3f}] |" in md
    header = drop.to_csv().splitlines()[0]
    assert header == "task,r2m,r2m low,r2m high,wa,wa low,wa high"

    champion = reporting.champion_table(verdict)
    assert list(champion.rows) == ["fs-ff", "fr-ff", "fs-cdf", "gan", "diff", "unseen macro mean"]
    assert champion.cell("gan", "judged as") == "warning only"
    assert champion.cell("fs-ff", "regression") == pytest.approx(auc["champion"]["fs-ff"] - auc["r2m"]["fs-ff"])


def test_gate_lines_mark_rules_and_warnings(verdict):
    doc = verdict.gate.as_dict()
    lines = reporting.gate_lines(doc)
    assert lines[-1] == verdict.gate.reason
    rule_lines = [line for line in lines if line.startswith("  [ok]") or line.startswith("  [FAIL]")]
    assert len(rule_lines) == len(verdict.gate.rules)
    for rule, line in zip(verdict.gate.rules, rule_lines):
        assert rule.name in line and f"[{rule.low:.4f}, {rule.high:.4f}]" in line
        assert ("(within noise)" in line) is rule.within_noise
    # the same lines from the JSON a run logged: a stored verdict renders like a fresh one
    assert reporting.gate_lines(json.loads(json.dumps(doc))) == lines
    assert "| max_drop |" in reporting.gate_markdown(doc)


def test_write_leaves_every_file_of_a_report(verdict, tmp_path):
    reporting.write(verdict, tmp_path)
    for name in ("report.md", "metrics.json", "gate_report.json", "summaries.json", "intervals.json",
                 "evaluation.json", "tables/seen_auc.csv", "tables/gate.md", "tables/champion_regression.md",
                 "plots/drop_gain_pareto.png", "plots/gain_heatmap.png", "plots/roc_r2m.png"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["drop_max"] == pytest.approx(verdict.summary.drop_max)
    assert metrics["regression/fs-ff/ci_low"] <= metrics["regression/fs-ff"] <= metrics["regression/fs-ff/ci_high"]
    summaries = json.loads((tmp_path / "summaries.json").read_text())
    assert set(summaries) == {"r2m", "wa"} and summaries["wa"]["intervals"]["drop_max"]
