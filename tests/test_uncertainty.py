"""The paired, grouped bootstrap behind every interval of a report (docs/method.md, "Intervals")."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from r2m.config import GateConfig
from r2m.evaluation.judge import judge_evaluation
from r2m.evaluation.metrics import task_metrics
from r2m.evaluation.protocol import Evaluation, ModelInfo, Roles, Task
from r2m.evaluation.uncertainty import BootstrapConfig, TaskPairs, bootstrap_intervals


def _task(rng, n_groups=20, per_group=6, separations=(0.0, 0.5, 1.0), decimals=2):
    groups = np.repeat([f"src{i:02d}" for i in range(n_groups)], per_group)
    labels = np.tile([0, 1] * (per_group // 2), n_groups)
    scores = {f"m{k}": np.round(rng.normal(size=labels.size) + sep * labels, decimals)  # rounded: ties happen
              for k, sep in enumerate(separations)}
    return labels, groups, scores


def test_resample_auc_is_sklearns_auc_with_the_group_counts_as_weights():
    rng = np.random.default_rng(0)
    labels, groups, scores = _task(rng)
    pairs = TaskPairs("t", labels, groups, scores)
    names, index = np.unique(groups, return_inverse=True)
    for counts in (np.ones(len(names)), rng.integers(0, 4, len(names)).astype(float)):
        counts[0] = max(counts[0], 1.0)
        for auc, model in zip(pairs.auc(counts), pairs.models):
            assert auc == pytest.approx(roc_auc_score(labels, scores[model], sample_weight=counts[index]), abs=1e-12)
    # a batch of resamples at once gives each resample's AUC
    batch = rng.integers(0, 3, (5, len(names))).astype(float) + 1
    together = pairs.auc(batch)
    for b in range(5):
        np.testing.assert_allclose(together[:, b], pairs.auc(batch[b]), rtol=1e-12)


def test_groups_are_resampled_whole():
    """Copies of the same image inside one group add no information: the grouped interval does
    not shrink when every image is repeated, while treating the copies as independent images would."""
    rng = np.random.default_rng(1)
    labels, groups, scores = _task(rng, n_groups=16, per_group=2, separations=(0.8,))
    rep = 5
    labels5, groups5 = np.repeat(labels, rep), np.repeat(groups, rep)
    scores5 = {m: np.repeat(s, rep) for m, s in scores.items()}

    def width(lab, grp, sc) -> float:
        iv = bootstrap_intervals([TaskPairs("t", lab, grp, sc)], lambda auc: {"a": auc["m0"]["t"]},
                                 BootstrapConfig(resamples=400))["a"]
        return iv.high - iv.low

    grouped = width(labels, groups, scores)
    assert width(labels5, groups5, scores5) == pytest.approx(grouped, rel=0.25)
    as_images = width(labels5, np.arange(labels5.size).astype(str), scores5)
    assert as_images < 0.7 * grouped


def test_paired_differences_are_narrower_than_either_auc():
    """Both models are scored on the same resample: a difference of two strongly correlated
    models varies much less than either AUC."""
    rng = np.random.default_rng(2)
    labels, groups, base = _task(rng, separations=(1.0,))
    scores = {"a": base["m0"], "b": base["m0"] + 0.05 * rng.normal(size=labels.size)}
    iv = bootstrap_intervals([TaskPairs("t", labels, groups, scores)],
                             lambda auc: {"a": auc["a"]["t"], "diff": auc["a"]["t"] - auc["b"]["t"]},
                             BootstrapConfig(resamples=400))
    assert iv["diff"].high - iv["diff"].low < 0.5 * (iv["a"].high - iv["a"].low)
    assert iv["a"].low < roc_auc_score(labels, scores["a"]) < iv["a"].high


def test_every_resample_keeps_the_classes_of_single_class_groups():
    """Videos are real or fake (FF++): groups of one class are resampled among their own kind, so
    no resample loses a class and every interval is defined."""
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 0, 0, 1, 1, 1], 4)  # three real videos, three fake videos, 4 frames each
    groups = np.repeat([f"v{i}" for i in range(6)], 4)
    scores = {"m": rng.normal(size=labels.size) + labels}
    pairs = TaskPairs("t", labels, groups, scores)
    assert [len(s) for s in pairs.strata] == [3, 3]
    iv = bootstrap_intervals([pairs], lambda auc: {"a": auc["m"]["t"]}, BootstrapConfig(resamples=200))["a"]
    assert np.isfinite(iv.low) and np.isfinite(iv.high) and iv.low <= iv.high


def test_intervals_are_reproducible_and_contain_the_point():
    rng = np.random.default_rng(4)
    labels, groups, scores = _task(rng)
    tasks = [TaskPairs("t", labels, groups, scores)]
    numbers = lambda auc: {"a": auc["m1"]["t"], "best": np.maximum(auc["m1"]["t"], auc["m2"]["t"])}  # noqa: E731
    first = bootstrap_intervals(tasks, numbers, BootstrapConfig(resamples=300, seed=7))
    assert first == bootstrap_intervals(tasks, numbers, BootstrapConfig(resamples=300, seed=7))
    assert first != bootstrap_intervals(tasks, numbers, BootstrapConfig(resamples=300, seed=8))
    point = roc_auc_score(labels, scores["m1"])
    assert first["a"].low <= point <= first["a"].high


def _evaluation(rng, n_groups=30):
    """Two seen tasks and one unseen set, two specialists, a candidate and a champion."""
    tasks = [Task("fs-ff", "FS", "ff", "seen"), Task("fr-ff", "FR", "ff", "seen"), Task("gan", "other", "x", "unseen")]
    separation = {
        "specialist-fs-ff": {"fs-ff": 3.0, "fr-ff": 0.3, "gan": 0.6},
        "specialist-fr-ff": {"fs-ff": 0.4, "fr-ff": 3.0, "gan": 0.5},
        "r2m": {"fs-ff": 2.6, "fr-ff": 2.6, "gan": 0.9},
        "champion": {"fs-ff": 2.9, "fr-ff": 1.0, "gan": 0.7},
    }
    groups = np.repeat([f"s{i}" for i in range(n_groups)], 4)
    labels = np.tile([0, 1, 0, 1], n_groups)
    metrics, scores = {}, {}
    for model, per in separation.items():
        metrics[model], scores[model] = {}, {}
        for task, sep in per.items():
            s = labels * sep + rng.normal(size=labels.size)
            metrics[model][task] = task_metrics(task, labels, s, groups)
            scores[model][task] = (labels.tolist(), s.tolist())
    kinds = {"specialist-fs-ff": ("specialist", "fs-ff"), "specialist-fr-ff": ("specialist", "fr-ff"),
             "r2m": ("merged", None), "champion": ("champion", None)}
    models = {m: ModelInfo(m, *kinds[m]) for m in separation}
    return Evaluation(tasks, models, metrics, scores, {t.name: groups.tolist() for t in tasks})


def test_judge_puts_an_interval_on_every_number_the_gate_reads():
    ev = _evaluation(np.random.default_rng(5))
    verdict = judge_evaluation(ev, Roles("r2m", ("specialist-fs-ff", "specialist-fr-ff"), "champion"),
                               GateConfig(interval_resamples=300))
    s = verdict.summary
    for name in ("drop_max", "drop_mean", "gain_macro", "regression_max", "regression_unseen_macro",
                 "drop/fs-ff", "gain/gan", "regression/fr-ff", "auc/fs-ff", "auc_seen_min"):
        low, high = s.interval(name)
        assert low <= high
    assert s.interval("drop/fs-ff")[0] <= s.drop["fs-ff"] <= s.interval("drop/fs-ff")[1]
    for rule in verdict.gate.rules:
        assert rule.low is not None and rule.low <= rule.value <= rule.high, rule
    # every scored model's AUC has an interval (the AUC tables)
    assert set(verdict.intervals["specialist-fr-ff"]) >= {"auc/fs-ff", "auc/fr-ff", "auc/gan", "auc_mean/ff"}
