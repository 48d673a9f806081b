"""Hyperparameter selection: a grid from the registry, scored by a caller-supplied function.

The caller scores a merged state dict on *seen validation* splits (e.g. mean AUC); this helper
never sees data, so unseen sets cannot leak into the choice. Ties keep the first grid point.
A method that declares a shared-grid evaluator (`MethodSpec.points`; R²M: ONE analysis serves
every r, core reading and α) gets its whole grid from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from r2m.errors import MergeError
from r2m.merging.registry import get_method
from r2m.merging.taskvectors import Runtime

Score = Callable[[dict[str, torch.Tensor], dict], float]


@dataclass
class Selection:
    """The chosen point. Only one merged model is in memory at a time: each point is scored and
    dropped, so the selection peaks at one merge (plus the method's scratch), whatever the grid;
    the caller merges the chosen point (`best_hparams`) into its output."""

    method: str
    best_hparams: dict
    best_score: float
    best_diagnostics: dict
    table: list[dict] = field(default_factory=list)  # one row per grid point: hparams + score


def select(method: str, pretrained, specialists: Sequence, score: Score, *, grid: dict[str, Sequence] | None = None,
           fixed: dict | None = None, runtime: Runtime | None = None, hierarchy: dict | None = None) -> Selection:
    """Merge at every grid point, keep the one with the highest `score(state_dict, hparams)`
    (`hierarchy`: the two-level merge's level-2 grid, see `MethodSpec.run_points`)."""
    spec = get_method(method)
    fixed = fixed or {}
    if runtime is not None and runtime.sink is not None:
        raise MergeError("select: results are scored in memory; do not pass a sink")
    points = [spec.resolve({**p, **fixed}) for p in spec.grid(grid)]
    best: tuple[float, dict, dict] | None = None
    table = []
    for hp, result in spec.run_points(pretrained, specialists, points, runtime, hierarchy):
        value = float(score(result.state_dict, hp))
        table.append({**hp, "score": value})
        if best is None or value > best[0]:
            best = (value, result.hparams, result.diagnostics)
        del result  # the next point is composed without this one in memory
    assert best is not None
    return Selection(method, best[1], best[0], best[2], table)
