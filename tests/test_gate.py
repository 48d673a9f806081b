"""DROP / GAIN / champion regression (SPEC section 6) and the gate, on hand-made AUC matrices."""

import json

import pytest

from r2m.config import GateConfig
from r2m.errors import EvaluationError, GateFailed
from r2m.evaluation import protocol
from r2m.evaluation.gate import check_gate
from r2m.evaluation.metrics import TaskMetrics
from r2m.evaluation.protocol import Evaluation, ModelInfo, Task

TASKS = [
    Task("fs-ff", "FS", "ff", "seen"),
    Task("fr-ff", "FR", "ff", "seen"),
    Task("fs-cdf", "FS", "cdf", "seen"),  # no own specialist: DROP uses the best one
    Task("gan", "other", "x", "unseen"),
    Task("diff", "other", "y", "unseen"),
]
AUC = {
    "specialist-fs-ff": {"fs-ff": 0.99, "fr-ff": 0.80, "fs-cdf": 0.90, "gan": 0.70, "diff": 0.60},
    "specialist-fr-ff": {"fs-ff": 0.85, "fr-ff": 0.98, "fs-cdf": 0.70, "gan": 0.50, "diff": 0.90},
    "r2m": {"fs-ff": 0.97, "fr-ff": 0.95, "fs-cdf": 0.88, "gan": 0.75, "diff": 0.85},
    "wa": {"fs-ff": 0.90, "fr-ff": 0.96, "fs-cdf": 0.80, "gan": 0.72, "diff": 0.70},
    "champion": {"fs-ff": 0.96, "fr-ff": 0.96, "fs-cdf": 0.86, "gan": 0.74, "diff": 0.84},
}
KINDS = {"specialist-fs-ff": ("specialist", "fs-ff"), "specialist-fr-ff": ("specialist", "fr-ff"),
         "r2m": ("merged", None), "wa": ("merged", None), "champion": ("champion", None)}


def _evaluation(auc=AUC, tasks=TASKS) -> Evaluation:
    metrics = {
        m: {t: TaskMetrics(t, a, 1 - a, a, None, 10, 10, 0) for t, a in per.items()}
        for m, per in auc.items()
    }
    models = {m: ModelInfo(m, *KINDS[m]) for m in auc}
    return Evaluation(tasks=list(tasks), models=models, metrics=metrics)


def test_drop_gain_and_regression_follow_the_definitions():
    s = protocol.summarize(_evaluation(), "r2m", champion="champion")
    # DROP_i = AUC_i(θ_i) − AUC_i(θ*): own specialist on fs-ff / fr-ff, best one on fs-cdf
    assert s.reference == {"fs-ff": "specialist-fs-ff", "fr-ff": "specialist-fr-ff",
                           "fs-cdf": "specialist-fs-ff"}
    assert s.drop == pytest.approx({"fs-ff": 0.02, "fr-ff": 0.03, "fs-cdf": 0.02})
    assert s.drop_max == pytest.approx(0.03)
    assert s.drop_mean == pytest.approx(0.07 / 3)
    # GAIN_j = AUC_j(θ*) − max_i AUC_j(θ_i)
    assert s.gain == pytest.approx({"gan": 0.05, "diff": -0.05})
    assert s.gain_mean == pytest.approx(0.0)
    # macro: mean_j AUC(θ*) − max_i mean_j AUC(θ_i) = 0.80 − max(0.65, 0.70)
    assert s.gain_macro == pytest.approx(0.10)
    assert s.best_specialist_unseen == "specialist-fr-ff"
    # regression vs champion on every shared task
    assert s.regression == pytest.approx(
        {"fs-ff": 0.01, "fr-ff": -0.01, "fs-cdf": 0.02, "gan": 0.01, "diff": 0.01})


def test_missing_scores_are_errors():
    auc = {k: dict(v) for k, v in AUC.items()}
    del auc["r2m"]["gan"]
    with pytest.raises(EvaluationError, match="'r2m' was not scored on task 'gan'"):
        protocol.summarize(_evaluation(auc), "r2m")
    with pytest.raises(EvaluationError, match="candidate 'nope'"):
        protocol.summarize(_evaluation(), "nope")


def _gate(**overrides) -> GateConfig:
    base = dict(max_drop=0.05, min_gain_macro=0.0, max_regression=0.02, min_auc=0.8)
    return GateConfig(**{**base, **overrides})


def test_gate_passes_when_every_rule_holds():
    report = check_gate(protocol.summarize(_evaluation(), "r2m", champion="champion"), _gate())
    assert report.passed and not report.failed_rules
    assert {r.name for r in report.rules} == {"max_drop", "min_gain_macro", "max_regression", "min_auc"}
    assert report.rule("max_regression").value == pytest.approx(0.01)
    assert report.reason.startswith("gate passed")
    report.raise_if_failed()  # no exception
    json.dumps(report.as_dict())  # every number is JSON-serialisable


@pytest.mark.parametrize(
    "rule, gate, task",
    [
        ("max_drop", _gate(max_drop=0.025), "fr-ff"),
        ("min_gain_macro", _gate(min_gain_macro=0.15), None),
        ("max_regression", _gate(max_regression=0.005), "fr-ff"),
        ("min_auc", _gate(min_auc=0.9), "fs-cdf"),
    ],
)
def test_gate_fails_on_each_rule_and_names_it(rule, gate, task):
    report = check_gate(protocol.summarize(_evaluation(), "r2m", champion="champion"), gate)
    assert not report.passed
    assert [r.name for r in report.failed_rules] == [rule]
    failed = report.rule(rule)
    assert failed.worst_task == task
    assert rule in report.reason and "\n" not in report.reason
    if task:
        assert task in report.reason
    with pytest.raises(GateFailed, match=rule) as info:
        report.raise_if_failed()
    assert info.value.report is report


def test_worse_candidate_fails_several_rules():
    report = check_gate(protocol.summarize(_evaluation(), "wa", champion="champion"), _gate())
    # wa: DROP fs-cdf 0.10 > 0.05; macro gain 0.71 − 0.70 = 0.01 passes; regression on diff 0.14
    assert {r.name for r in report.failed_rules} == {"max_drop", "max_regression"}
    assert report.rule("max_drop").value == pytest.approx(0.10)  # fs-cdf: 0.90 − 0.80
    assert report.rule("max_drop").worst_task == "fs-cdf"
    assert "max_drop: 0.1000 on fs-cdf > 0.05" in report.reason
    assert "max_regression: 0.1400 on diff > 0.02" in report.reason


def test_rules_apply_only_when_their_inputs_exist():
    seen_only = [t for t in TASKS if t.role == "seen"]
    auc = {m: {t: a for t, a in v.items() if t in {x.name for x in seen_only}} for m, v in AUC.items()}
    report = check_gate(protocol.summarize(_evaluation(auc, seen_only), "r2m"), _gate())
    assert {r.name for r in report.rules} == {"max_drop", "min_auc"}
    assert any(s.startswith("min_gain_macro") for s in report.skipped)
    assert any(s.startswith("max_regression") for s in report.skipped)
    assert report.passed


def test_tables_have_the_papers_shape():
    ev = _evaluation()
    seen = protocol.seen_auc_table(ev)
    # columns grouped by domain, each followed by its mean (Table 1)
    assert list(seen.columns) == ["fs-cdf", "cdf mean", "fr-ff", "fs-ff", "ff mean"]
    assert seen.cell("r2m", "ff mean") == pytest.approx(0.96)
    unseen = protocol.unseen_auc_table(ev)
    assert unseen.cell("specialist-fr-ff", "mean") == pytest.approx(0.70)
    drop = protocol.drop_table(ev, ["wa", "r2m"])
    assert list(drop.rows) == ["fs-ff", "fr-ff", "fs-cdf", "mean", "max"]
    assert drop.cell("max", "r2m") == pytest.approx(0.03)
    gain = protocol.gain_table(ev, ["wa", "r2m"])
    assert gain.cell("macro", "r2m") == pytest.approx(0.10)
    assert gain.cell("gan", "wa") == pytest.approx(0.02)
    md = drop.to_markdown()
    assert "| task | wa | r2m |" in md and "| max | 0.100 | 0.030 |" in md
    assert drop.to_csv().splitlines()[0] == "task,wa,r2m"
    points = protocol.pareto_points(ev, ["wa", "r2m"])
    assert points["r2m"] == pytest.approx((0.07 / 3, 0.0))
