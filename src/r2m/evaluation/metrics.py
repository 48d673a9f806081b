"""Per-task detection metrics (docs/method.md, "Metrics"): image-level AUC (the paper's metric), EER, AP,
and video-level AUC where frames group into videos.

Labels: 1 = fake (the positive class), 0 = real; scores are P(fake) = softmax(logits)[:, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from r2m.errors import EvaluationError


@dataclass(frozen=True)
class TaskMetrics:
    """Everything measured on one task (one dataset split)."""

    task: str
    auc: float
    eer: float
    ap: float
    video_auc: float | None  # None when no group holds more than one sample
    n_real: int
    n_fake: int
    n_videos: int  # videos (groups) when frames group into videos, else 0

    def as_dict(self) -> dict:
        return asdict(self)


def _check(task: str, labels: np.ndarray, scores: np.ndarray) -> None:
    """Both classes present, scores finite, shapes equal -- else an error naming the task."""
    if labels.shape != scores.shape or labels.ndim != 1:
        raise EvaluationError(
            f"task '{task}': {labels.shape[0]} labels but {scores.shape[0]} scores"
        )
    if labels.size == 0:
        raise EvaluationError(f"task '{task}': no samples to score")
    if not np.isin(labels, (0, 1)).all():
        raise EvaluationError(f"task '{task}': labels must be 0 (real) or 1 (fake)")
    present = set(np.unique(labels).tolist())
    if present != {0, 1}:
        only = "real" if present == {0} else "fake"
        raise EvaluationError(
            f"task '{task}': only {only} samples ({labels.size}); AUC needs real and fake"
        )
    if not np.isfinite(scores).all():
        raise EvaluationError(f"task '{task}': non-finite scores")


def _arrays(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(labels, dtype=np.int64).ravel(), np.asarray(scores, dtype=np.float64).ravel()


def auc(labels: Sequence[int], scores: Sequence[float], task: str = "task") -> float:
    """Image-level ROC AUC (paper §4: AUC_i(θ) on the held-out test split); ties count one half."""
    y, s = _arrays(labels, scores)
    _check(task, y, s)
    return float(roc_auc_score(y, s))


def roc(labels: Sequence[int], scores: Sequence[float], task: str = "task") -> tuple[np.ndarray, np.ndarray]:
    """ROC curve points (fpr, tpr), for plots."""
    y, s = _arrays(labels, scores)
    _check(task, y, s)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr


def eer(labels: Sequence[int], scores: Sequence[float], task: str = "task") -> float:
    """Equal error rate: the point of the ROC curve where FPR = FNR (= 1 - TPR).

    The ROC is piecewise linear between thresholds, so the crossing is interpolated on the
    segment where FPR - FNR changes sign.
    """
    fpr, tpr = roc(labels, scores, task)
    fnr = 1.0 - tpr
    diff = fpr - fnr  # non-decreasing from -1 (fpr=0, fnr=1) to +1
    k = int(np.searchsorted(diff, 0.0, side="left"))
    if k == 0:
        return float(fpr[0])
    if diff[k] == 0.0:
        return float(fpr[k])
    # linear interpolation between points k-1 and k
    w = -diff[k - 1] / (diff[k] - diff[k - 1])
    return float(fpr[k - 1] + w * (fpr[k] - fpr[k - 1]))


def average_precision(labels: Sequence[int], scores: Sequence[float], task: str = "task") -> float:
    """Average precision with fake as the positive class."""
    y, s = _arrays(labels, scores)
    _check(task, y, s)
    return float(average_precision_score(y, s))


def video_scores(
    labels: Sequence[int], scores: Sequence[float], groups: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Mean frame score per video (group); the key is (label, group) so a real and a fake video
    that share an id stay apart. Empty when no group holds more than one sample (loose images)."""
    y, s = _arrays(labels, scores)
    members: dict[tuple[int, str], list[float]] = {}
    for label, score, group in zip(y.tolist(), s.tolist(), groups):
        members.setdefault((label, str(group)), []).append(score)
    videos = [(key[0], float(np.mean(v))) for key, v in members.items()]
    if all(len(v) == 1 for v in members.values()):
        return np.empty(0, np.int64), np.empty(0, np.float64)
    vy, vs = zip(*videos)
    return np.asarray(vy, np.int64), np.asarray(vs, np.float64)


def task_metrics(
    task: str,
    labels: Sequence[int],
    scores: Sequence[float],
    groups: Sequence[str] | None = None,
) -> TaskMetrics:
    """AUC, EER, AP and (where frames group into videos of both classes) video-level AUC."""
    y, s = _arrays(labels, scores)
    _check(task, y, s)
    video_auc, n_videos = None, 0
    if groups is not None:
        if len(groups) != y.size:
            raise EvaluationError(f"task '{task}': {y.size} labels but {len(groups)} group ids")
        vy, vs = video_scores(y, s, groups)
        n_videos = int(vy.size)
        if set(vy.tolist()) == {0, 1}:
            video_auc = float(roc_auc_score(vy, vs))
    return TaskMetrics(
        task=task,
        auc=auc(y, s, task),
        eer=eer(y, s, task),
        ap=average_precision(y, s, task),
        video_auc=video_auc,
        n_real=int((y == 0).sum()),
        n_fake=int((y == 1).sum()),
        n_videos=n_videos,
    )
