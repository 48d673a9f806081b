"""Metric definitions (docs/method.md, "Metrics") on hand-made score vectors."""

import math

import numpy as np
import pytest

from r2m.errors import EvaluationError
from r2m.evaluation.metrics import auc, average_precision, eer, task_metrics, video_scores


def _pairwise_auc(labels, scores):
    """AUC by its definition: P(score_fake > score_real) + ½ P(tie), over all pairs."""
    fake = [s for y, s in zip(labels, scores) if y == 1]
    real = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum((f > r) + 0.5 * (f == r) for f in fake for r in real)
    return wins / (len(fake) * len(real))


def test_auc_perfect_inverted_and_chance():
    labels = [0, 0, 0, 1, 1, 1]
    assert auc(labels, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]) == 1.0
    assert auc(labels, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]) == 0.0
    assert auc(labels, [0.5] * 6) == 0.5  # all tied: chance


def test_auc_counts_ties_as_one_half():
    labels = [0, 0, 1, 1]
    scores = [0.2, 0.6, 0.6, 0.9]  # one real-fake tie at 0.6
    # pairs (fake, real): (0.6,0.2)=1, (0.6,0.6)=½, (0.9,0.2)=1, (0.9,0.6)=1 -> 3.5/4
    assert auc(labels, scores) == pytest.approx(0.875)


def test_auc_matches_pairwise_definition_on_random_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes many ties
    assert auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores))


def test_eer_hand_computed():
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    # separable: EER 0
    assert eer(labels, [0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9]) == 0.0
    # one real above the threshold and one fake below it at the crossing: EER 1/4
    scores = [0.1, 0.2, 0.3, 0.75, 0.35, 0.7, 0.8, 0.9]
    assert eer(labels, scores) == pytest.approx(0.25)
    # all tied: the ROC is the diagonal, FPR = FNR = 0.5 at its middle
    assert eer(labels, [0.5] * 8) == pytest.approx(0.5)


def test_average_precision_hand_computed():
    labels = [1, 0, 1, 0]
    scores = [0.9, 0.8, 0.7, 0.1]  # ranked: fake, real, fake, real
    # precision at each fake: 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    assert average_precision(labels, scores) == pytest.approx((1 + 2 / 3) / 2)


def test_one_class_is_a_clear_error_naming_the_task():
    with pytest.raises(EvaluationError, match=r"task 'fs-ff': only real samples"):
        auc([0, 0, 0], [0.1, 0.5, 0.9], task="fs-ff")
    with pytest.raises(EvaluationError, match=r"task 'x': only fake samples"):
        task_metrics("x", [1, 1], [0.3, 0.4])


def test_bad_inputs_are_errors():
    with pytest.raises(EvaluationError, match="3 labels but 2 scores"):
        auc([0, 1, 1], [0.1, 0.2], task="t")
    with pytest.raises(EvaluationError, match="non-finite"):
        auc([0, 1], [0.1, math.nan], task="t")
    with pytest.raises(EvaluationError, match="no samples"):
        auc([], [], task="t")


def test_video_auc_averages_frames_per_video():
    # two real videos and two fake videos, 3 frames each; frame-level AUC is imperfect,
    # video means separate perfectly
    labels = [0] * 6 + [1] * 6
    scores = [0.1, 0.2, 0.7, 0.2, 0.3, 0.1, 0.6, 0.5, 0.9, 0.4, 0.8, 0.9]
    groups = ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["c"] * 3  # "a" in both classes stays apart
    vy, vs = video_scores(labels, scores, groups)
    assert sorted(zip(vy.tolist(), np.round(vs, 4).tolist())) == [
        (0, 0.2), (0, 0.3333), (1, 0.6667), (1, 0.7)
    ]
    tm = task_metrics("frames", labels, scores, groups)
    assert tm.video_auc == 1.0 and tm.n_videos == 4
    assert tm.auc == pytest.approx(_pairwise_auc(labels, scores)) and tm.auc < 1.0
    assert (tm.n_real, tm.n_fake) == (6, 6)


def test_no_video_auc_for_loose_images():
    tm = task_metrics("loose", [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], ["a", "b", "c", "d"])
    assert tm.video_auc is None and tm.n_videos == 0
    assert task_metrics("no-groups", [0, 1], [0.1, 0.9]).video_auc is None
