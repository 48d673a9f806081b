"""95 % intervals for every number of a report: a paired, grouped, stratified bootstrap.

What is resampled (docs/method.md, "Intervals"):

- **whole groups**, not images: the group is what the splits never cut (a video, a source
  photograph; `r2m.data.splits.group_of`), so the correlated crops or frames of one source are
  drawn together and the interval is not narrowed by counting them as independent;
- **each task on its own** (a stratified bootstrap), and within a task each *stratum* of groups
  on its own: groups holding the same set of classes (real only, fake only, both) are resampled
  among themselves, so every resample keeps the task's number of real and fake groups and its
  AUC is always defined;
- **paired**: every model is scored on the same resample, so a difference (DROP, GAIN,
  regression) is judged on the same images for both models.

A number of the report is a function of the AUC matrix (model × task); the bootstrap applies
the *same* function that gives the point estimate (`r2m.evaluation.protocol.numbers`) to the AUC
matrix of each resample. The resampling and the interval are scipy's (`scipy.stats.bootstrap`,
BCa by default). The AUC of a resample is the exact Mann–Whitney AUC of the resampled images
(each group counted as often as it was drawn), computed for all resamples at once from the
per-group-pair counts of (fake score > real score) + ½ (ties); it equals
`sklearn.metrics.roc_auc_score` with the group multiplicities as sample weights (tested).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import stats

Numbers = Callable[[Mapping[str, Mapping[str, np.ndarray]]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def straddles(self, threshold: float) -> bool:
        """The threshold lies inside the interval: the rule's outcome is within noise."""
        return self.low <= threshold <= self.high


@dataclass(frozen=True)
class BootstrapConfig:
    resamples: int = 1000
    level: float = 0.95
    method: str = "BCa"
    seed: int = 0


class TaskPairs:
    """One task's images reduced to what every resample needs: for each model, the matrix
    A[g, h] = Σ_{fake p in group g} Σ_{real n in group h} (1[s_p > s_n] + ½·1[s_p = s_n]),
    and the fakes and reals per group. AUC of a resample with group counts c:
    cᵀAc / ((c·n_fake)(c·n_real))."""

    def __init__(self, task: str, labels: Sequence[int], groups: Sequence[str],
                 scores: Mapping[str, Sequence[float]]):
        y = np.asarray(labels, dtype=np.int64)
        names, index = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
        self.task = task
        self.n_groups = len(names)
        self.n_fake = np.bincount(index[y == 1], minlength=self.n_groups).astype(np.float64)
        self.n_real = np.bincount(index[y == 0], minlength=self.n_groups).astype(np.float64)
        # strata: groups with the same classes are resampled among themselves
        kind = (self.n_fake > 0).astype(int) * 2 + (self.n_real > 0).astype(int)
        self.strata = [np.flatnonzero(kind == k) for k in sorted(set(kind.tolist()))]
        self.models = list(scores)
        self.pairs = np.stack([self._pairs(np.asarray(scores[m], dtype=np.float64), y, index) for m in self.models])

    def _pairs(self, s: np.ndarray, y: np.ndarray, index: np.ndarray) -> np.ndarray:
        fake_s, fake_g = s[y == 1], index[y == 1]
        real_s, real_g = s[y == 0], index[y == 0]
        out = np.zeros((self.n_groups, self.n_groups))
        for h in np.unique(real_g):
            column = np.sort(real_s[real_g == h])
            below = np.searchsorted(column, fake_s, side="left")
            ties = np.searchsorted(column, fake_s, side="right") - below
            out[:, h] = np.bincount(fake_g, weights=below + 0.5 * ties, minlength=self.n_groups)
        return out

    def auc(self, counts: np.ndarray) -> np.ndarray:
        """AUC of every model for group counts `counts` [..., n_groups] -> [models, ...]."""
        num = np.einsum("...g,mgh,...h->m...", counts, self.pairs, counts)
        den = (counts @ self.n_fake) * (counts @ self.n_real)
        return num / den


def _counts(drawn: np.ndarray, members: np.ndarray, n_groups: int) -> np.ndarray:
    """How often each group of the task was drawn: `drawn` [..., k] holds positions in `members`."""
    lead = drawn.shape[:-1]
    flat = drawn.reshape(-1, drawn.shape[-1])
    rows = np.repeat(np.arange(flat.shape[0]), flat.shape[1])
    groups = members[flat.ravel().astype(np.int64)]
    out = np.bincount(rows * n_groups + groups, minlength=flat.shape[0] * n_groups)
    return out.reshape(*lead, n_groups).astype(np.float64)


def bootstrap_intervals(tasks: Sequence[TaskPairs], numbers: Numbers, cfg: BootstrapConfig = BootstrapConfig()
                        ) -> dict[str, Interval]:
    """An interval for every number `numbers(auc)` returns, `auc[model][task]` being the AUC of
    the resample (arrays, one value per resample)."""
    samples, owners = [], []
    fixed = [np.zeros(task.n_groups) for task in tasks]  # a stratum of one group is always drawn once
    for t, task in enumerate(tasks):
        for stratum in task.strata:
            if len(stratum) < 2:
                fixed[t][stratum] = 1.0
                continue
            samples.append(np.arange(len(stratum)))
            owners.append((t, stratum))
    names: list[str] = []

    def statistic(*drawn: np.ndarray, axis: int = -1) -> np.ndarray:
        lead = np.broadcast_shapes(*(d.shape[:-1] for d in drawn))
        counts = [np.broadcast_to(f, (*lead, task.n_groups)).copy() for f, task in zip(fixed, tasks)]
        for d, (t, stratum) in zip(drawn, owners):
            counts[t] = counts[t] + _counts(np.broadcast_to(d, (*lead, d.shape[-1])), stratum, tasks[t].n_groups)
        auc: dict[str, dict[str, np.ndarray]] = {}
        for task, c in zip(tasks, counts):
            for m, values in zip(task.models, task.auc(c)):
                auc.setdefault(m, {})[task.task] = values
        result = numbers(auc)
        if not names:
            names.extend(result)
        return np.stack([np.broadcast_to(np.asarray(result[n], dtype=np.float64), lead) for n in names])

    point = statistic(*samples)  # also fixes the order of the names
    if not names:
        return {}
    if not samples:  # nothing to resample (one group per stratum): the numbers cannot vary
        return {name: Interval(float(point[i]), float(point[i])) for i, name in enumerate(names)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate (constant) numbers: handled below
        res = stats.bootstrap(tuple(samples), statistic, n_resamples=cfg.resamples, vectorized=True, paired=False,
                              confidence_level=cfg.level, method=cfg.method, rng=np.random.default_rng(cfg.seed),
                              batch=max(1, min(cfg.resamples, 200)))
    low, high = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
    distribution = np.atleast_2d(res.bootstrap_distribution)
    alpha = (1 - cfg.level) / 2
    out = {}
    for i, name in enumerate(names):
        lo, hi = float(low[i]), float(high[i])
        if not (np.isfinite(lo) and np.isfinite(hi)):  # BCa undefined (a constant number): percentiles
            values = distribution[i][np.isfinite(distribution[i])]
            lo, hi = (float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))) if values.size \
                else (float(point[i]), float(point[i]))
        out[name] = Interval(min(lo, float(point[i])), max(hi, float(point[i])))
    return out


__all__ = ["BootstrapConfig", "Interval", "TaskPairs", "bootstrap_intervals"]
