"""Weight averaging (paper B.1): θ_avg = θ0 + (1/N) Σ_i τ_i = (1/N) Σ_i θ_i. No hyperparameters."""

from __future__ import annotations

from typing import Sequence

import torch

from r2m.merging.stream import Sink
from r2m.merging.taskvectors import MergeResult, Runtime, TaskVectors, TensorPlan, weight_mean


def weight_average(pretrained, specialists: Sequence, *, runtime: Runtime | None = None) -> MergeResult:
    """θ_avg, computed as the float64 mean of the θ_i (bit-exact for N = 1 and identical specialists)."""
    return average(TaskVectors(pretrained, specialists, runtime))


def average(tv: TaskVectors, diagnostics: dict | None = None, sink: Sink | None = None) -> MergeResult:
    """θ_avg over already validated inputs (also R²M's answer for degenerate inputs)."""

    def merged(p: TensorPlan, theta0: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
        return weight_mean(stack, inplace=True)

    sink = tv.write(merged, with_theta0=False, desc="wa", sink=sink)  # θ_avg never reads θ0's floats
    return tv.result("wa", {}, sink, diagnostics or {"n_specialists": tv.n})
