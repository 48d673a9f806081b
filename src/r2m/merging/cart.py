"""CART (Choi et al., 2024a): centre the task vectors at their mean, truncate, add back.

Official code's form: θ_cart = θ_avg + η · Σ_i SVD_r(τ_i − τ̄) on the attention/MLP weight
matrices (the same layer set and Q/K/V split as R²M's step 4); every other tensor is θ_avg.
Paper B.1 writes θ_avg + η · τ̂^(r) without saying whether τ̂^(r) sums or averages the
truncated residuals; `form="mean"` offers the averaged reading, (1/N) Σ_i SVD_r(τ_i − τ̄).
Grid (§4 tuning protocol): η ∈ {0.5, 1.0} × r ∈ {0.1, 0.3, 0.5, 0.7}.
"""

from __future__ import annotations

import time
from typing import Literal, Sequence

import torch

from r2m.merging.linalg import truncate_blocks
from r2m.merging.taskvectors import (MergeResult, Runtime, TaskVectors, TensorPlan, centred, check_choice, check_ratio, row_sum,
                                     task_vectors, weight_mean)


def cart(pretrained, specialists: Sequence, *, eta: float = 1.0, rank: float = 0.1, form: Literal["sum", "mean"] = "sum", runtime: Runtime | None = None) -> MergeResult:
    check_choice("CART", "form", form, ("sum", "mean"))
    check_ratio("CART", "rank ratio", rank)
    tv = TaskVectors(pretrained, specialists, runtime)
    device = tv.runtime.resolved_device()
    scale = eta if form == "sum" else eta / tv.n
    svd_seconds = 0.0

    def merged(p: TensorPlan, theta0: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
        nonlocal svd_seconds
        theta_avg = weight_mean(stack)
        if not p.blocks:
            return theta_avg
        start = time.perf_counter()
        truncated, _ = truncate_blocks(centred(task_vectors(theta0, stack)), p.matrix_shape, p.blocks, rank, device)
        svd_seconds += time.perf_counter() - start
        return theta_avg + scale * row_sum(truncated)

    sink = tv.write(merged, desc="cart")
    return tv.result("cart", {"eta": eta, "rank": rank, "form": form}, sink, {"n_specialists": tv.n, "svd_seconds": svd_seconds})
