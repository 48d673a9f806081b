"""Hyperparameter selection: a grid from the registry, scored by a caller-supplied function.

The caller scores a merged state dict on *seen validation* splits (e.g. mean AUC); this helper
never sees data, so unseen sets cannot leak into the choice. Ties keep the first grid point.
For R²M the whole grid comes from ONE analysis (`r2m.r2m_points`): one eigendecomposition per
(specialist, matrix block) serves every r, the core reading and α only change N×N algebra, and
each point is composed from disk scratch (a temporary `DiskScratch` unless the runtime brings
one), so memory stays that of one merged model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from r2m.errors import MergeError
from r2m.merging.r2m import r2m_points
from r2m.merging.registry import get_method
from r2m.merging.stream import DiskScratch
from r2m.merging.taskvectors import MergeResult, Runtime, TaskVectors

Score = Callable[[dict[str, torch.Tensor], dict], float]


@dataclass
class Selection:
    method: str
    best_hparams: dict
    best_score: float
    best: MergeResult
    table: list[dict] = field(default_factory=list)  # one row per grid point: hparams + score


def select(method: str, pretrained, specialists: Sequence, score: Score, *, grid: dict[str, Sequence] | None = None, fixed: dict | None = None, runtime: Runtime | None = None) -> Selection:
    """Merge at every grid point, keep the one with the highest `score(state_dict, hparams)`."""
    spec = get_method(method)
    fixed = fixed or {}
    if runtime is not None and runtime.sink is not None:
        raise MergeError("select: results are scored in memory; do not pass a sink")
    points = [spec.resolve({**p, **fixed}) for p in spec.grid(grid)]
    best: tuple[float, MergeResult] | None = None
    table = []
    for hp, result in _results(spec, points, pretrained, specialists, runtime):
        value = float(score(result.state_dict, hp))
        table.append({**hp, "score": value})
        if best is None or value > best[0]:
            best = (value, result)
    assert best is not None
    return Selection(method, best[1].hparams, best[0], best[1], table)


def _results(spec, points, pretrained, specialists, runtime):
    if spec.name != "r2m":
        for hp in points:
            yield hp, spec.fn(pretrained, specialists, runtime=runtime, **hp)
        return
    own = runtime is None or runtime.scratch is None
    if own:
        runtime = Runtime(**{**(runtime.__dict__ if runtime else {}), "scratch": DiskScratch()})
    order = sorted(points, key=lambda h: (h["rank"], h["k"], h["core"]))  # stable: α varies fastest
    try:
        yield from r2m_points(TaskVectors(pretrained, specialists, runtime), order)
    finally:
        if own:
            runtime.scratch.close()
