"""Task arithmetic (Ilharco et al., 2022).

Original form: θ_ta = θ0 + λ · Σ_i τ_i. Paper B.1 writes the mean form θ0 + λ · (1/N) Σ_i τ_i,
offered as `form="mean"`. Grid (§4 tuning protocol, global magnitude): λ ∈ {0.5, 1.0}.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from r2m.errors import MergeError
from r2m.merging.taskvectors import MergeResult, Runtime, TaskVectors, TensorPlan, row_sum, task_vectors


def task_arithmetic(pretrained, specialists: Sequence, *, lam: float = 0.5, form: Literal["sum", "mean"] = "sum", runtime: Runtime | None = None) -> MergeResult:
    if form not in ("sum", "mean"):
        raise MergeError(f"task arithmetic: form must be 'sum' or 'mean', got {form!r}")
    tv = TaskVectors(pretrained, specialists, runtime)
    scale = lam if form == "sum" else lam / tv.n

    def merged(p: TensorPlan, theta0: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
        return theta0 + scale * row_sum(task_vectors(theta0, stack))

    sink = tv.write(merged, desc="ta")
    return tv.result("ta", {"lam": lam, "form": form}, sink, {"n_specialists": tv.n})
